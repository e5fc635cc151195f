"""Pseudo-abnormal boxes: seed 001's pseudo-abnormal module (Georgescu, KES 2023, Sec. 3.3).

A reconstruction of a normal image becomes a positive ("pseudo-abnormal") training sample for the
anomaly classifier by scaling the intensities inside ``k`` random boxes:

- ``k ~ U{k1, ..., k2}`` boxes (paper: ``[1, 10]``, Sec. 4.3; Table 2c ablates the range);
- each side length ``~ U{s1, ..., s2}`` pixels (paper: 10-40 px at 224 x 224, 5-12 px at 64 x 64);
- every pixel of a box is multiplied by one ``beta ~ U(0, 1)``, or, with ``beta_per_pixel``
  (the Sec. 4.5 ablation), by its own ``beta``.

Not in the paper: ``min_change`` redraws the boxes of an image until they change its intensities by
at least that much in total (sum of absolute changes). A box on the background (intensity 0), or
with ``beta`` close to 1, leaves the image as it was, and a positive sample equal to its negative is
a mislabeled one. The author's released code drops pseudo-abnormal samples of empty images for the
same reason (``extract_reconstructions.py``: ``if is_abnormal and img_.sum() == 0: continue``); on
the CPU presets' small images a third of the frame or more is background. ``0`` (the default) never
redraws.

Written like a MONAI array transform: it takes one channel-first image (C, *spatial) as a tensor,
draws its parameters in ``randomize`` from its own ``numpy.random.RandomState`` (``set_random_state``
makes it reproducible), and leaves the drawn boxes and betas on the instance for inspection.
``pseudo_abnormal_boxes`` applies it to every image of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch import Tensor

__all__ = ["PseudoAbnormalBoxes", "pseudo_abnormal_boxes"]


class PseudoAbnormalBoxes(Randomizable, Transform):
    """Multiply ``k`` random boxes of a (C, *spatial) image by random factors in (0, 1).

    Args:
        k_range: inclusive range ``(k1, k2)`` of the number of boxes.
        box_size_range: inclusive range of each side length in pixels (voxels), drawn per axis; a
            side longer than the image axis is cut to the axis.
        beta_per_pixel: one factor per pixel of a box instead of one per box.
        seed: seed of the transform's own random state.
        min_change: least total absolute change (summed over the image) a draw must make; a draw
            that changes less is redrawn, up to ``max_redraws`` times (the last draw is kept).
        max_redraws: how many times a draw may be redrawn for ``min_change``.

    After a call, ``boxes`` holds one tuple of slices per box (spatial axes only) and ``betas`` the
    factor of each box: a float, or an array of the box's spatial shape with ``beta_per_pixel``.
    Boxes may overlap; overlapping regions are multiplied by each box's factor in turn.
    """

    def __init__(
        self,
        k_range: Sequence[int] = (1, 10),
        box_size_range: Sequence[int] = (10, 40),
        beta_per_pixel: bool = False,
        seed: int | None = 0,
        min_change: float = 0.0,
        max_redraws: int = 20,
    ) -> None:
        k1, k2 = (int(v) for v in k_range)
        s1, s2 = (int(v) for v in box_size_range)
        if not 0 <= k1 <= k2:
            raise ValueError(f"k_range must be (k1, k2) with 0 <= k1 <= k2, got {tuple(k_range)}")
        if not 1 <= s1 <= s2:
            raise ValueError(
                f"box_size_range must be (s1, s2) with 1 <= s1 <= s2, got {tuple(box_size_range)}"
            )
        self.k_range = (k1, k2)
        self.box_size_range = (s1, s2)
        self.beta_per_pixel = beta_per_pixel
        if min_change < 0 or max_redraws < 0:
            raise ValueError(f"min_change and max_redraws must be >= 0, got {min_change}, {max_redraws}")
        self.min_change = float(min_change)
        self.max_redraws = int(max_redraws)
        self.boxes: list[tuple[slice, ...]] = []
        self.betas: list[float | np.ndarray] = []
        # Randomizable's default state is shared by all instances: give this one its own.
        self.set_random_state(seed)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        k = int(self.R.randint(self.k_range[0], self.k_range[1] + 1))
        s1, s2 = self.box_size_range
        self.boxes, self.betas = [], []
        for _ in range(k):
            box = []
            for size in spatial_shape:
                side = min(int(self.R.randint(s1, s2 + 1)), int(size))
                start = int(self.R.randint(0, int(size) - side + 1))
                box.append(slice(start, start + side))
            self.boxes.append(tuple(box))
            if self.beta_per_pixel:
                shape = tuple(s.stop - s.start for s in box)
                self.betas.append(self.R.uniform(0.0, 1.0, size=shape).astype(np.float32))
            else:
                self.betas.append(float(self.R.uniform(0.0, 1.0)))

    def __call__(self, img: Tensor, randomize: bool = True) -> Tensor:  # type: ignore[override]
        """A pseudo-abnormal copy of ``img`` (C, *spatial); ``img`` itself is not changed.

        With ``randomize`` and ``min_change > 0``, boxes are redrawn until the copy differs from
        ``img`` by at least ``min_change`` in total (or ``max_redraws`` redraws were spent).
        """
        redraws = self.max_redraws if randomize and self.min_change > 0 else 0
        for _ in range(redraws + 1):
            if randomize:
                self.randomize(img.shape[1:])
            out = self._apply(img)
            if float((out - img).abs().sum()) >= self.min_change:
                break
        return out

    def _apply(self, img: Tensor) -> Tensor:
        out = img.clone()
        for box, beta in zip(self.boxes, self.betas):
            region = (slice(None), *box)
            if isinstance(beta, np.ndarray):
                factor = torch.as_tensor(beta, dtype=out.dtype, device=out.device).unsqueeze(0)
                out[region] = out[region] * factor  # one beta per pixel, shared by the channels
            else:
                out[region] = out[region] * beta
        return out


def pseudo_abnormal_boxes(images: Tensor, transform: PseudoAbnormalBoxes) -> Tensor:
    """Apply ``transform`` to each image of a batch (B, C, *spatial), drawing new boxes for each."""
    return torch.stack([transform(image) for image in images])
