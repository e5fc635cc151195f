"""The six hard augmentations of seed 000 (Sec. 4, Fig. 9) and an intensity blob, as local anomalies.

Seed 000 ("online joint embedding of 2D and 3D networks", Sec. 4 and Fig. 9) synthesises
out-of-distribution areas with six *hard augmentations*:

- ``mask``: the area gets one random intensity in [0, 1];
- ``sobel_filter``: a Sobel filter is applied to the area;
- ``rotation``: the area is rotated;
- ``copy_paste``: a copied patch from elsewhere is pasted onto the area;
- ``permutation``: the area is cut into 8 sub-patches (halves along x, y and z) which are shuffled;
- ``scar``: copy-paste onto a very small area (CutPaste's scar, seed 000 ref. [27]).

The area is a box "from 10 pixel to half of the input size for each dimension"; voxels that keep
their value are not part of the OOD area, and a synthesis with fewer than 20 changed voxels is
redone (Sec. 4). ``intensity_blob`` adds the MOOD-style smooth bright or dark blob.

Every transform is a callable class in the manner of MONAI's array transforms, dimension-agnostic
(2D or 3D, single channel, no channel axis), driven by a ``numpy.random.Generator`` and expecting
intensities in [0, 1]. ``transform(image, rng)`` returns the augmented copy;
``transform.apply(image, rng)`` also returns the region it was allowed to change, and
``changed_voxels`` turns that into the ground-truth anomaly mask.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage

#: A voxel belongs to the anomaly mask when the augmentation moved it by more than this.
CHANGE_EPS = 1e-6
#: Seed 000 Sec. 4: "we perform the OOD synthesis process again when the generated OOD is less than 20 voxels".
MIN_ANOMALY_VOXELS = 20


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: ``start`` and ``size`` per axis, in voxels."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(b, b + n) for b, n in zip(self.start, self.size, strict=True))


@dataclass(frozen=True)
class Corruption:
    """What one augmentation did: the augmented image and the region it was allowed to change."""

    name: str
    image: np.ndarray
    region: np.ndarray  # bool, same shape as the image
    box: Box

    def anomaly_mask(self, before: np.ndarray, eps: float = CHANGE_EPS) -> np.ndarray:
        """Voxels of the region that really changed (seed 000 Sec. 4: unchanged ones are not OOD)."""
        return changed_voxels(before, self.image, self.region, eps)


def changed_voxels(
    before: np.ndarray, after: np.ndarray, region: np.ndarray | None = None, eps: float = CHANGE_EPS
) -> np.ndarray:
    """Boolean mask of voxels with ``|after - before| > eps``, restricted to ``region`` when given."""
    changed = np.abs(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)) > eps
    return changed if region is None else changed & region


class HardAugmentation(ABC):
    """A local corruption of a random box.

    Args:
        min_size: smallest box side in voxels (seed 000 Sec. 4: 10), capped by ``max_fraction``.
        max_fraction: largest box side as a fraction of the image side (seed 000 Sec. 4: half).
    """

    name: ClassVar[str]

    def __init__(self, min_size: int = 10, max_fraction: float = 0.5) -> None:
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
        self.min_size = min_size
        self.max_fraction = max_fraction

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, center: Sequence[int] | None = None
    ) -> np.ndarray:
        """The augmented copy of ``image``; the box is centred on ``center`` when given."""
        return self.apply(image, rng, center).image

    def apply(
        self, image: np.ndarray, rng: np.random.Generator, center: Sequence[int] | None = None
    ) -> Corruption:
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(
                f"{self.name}: expected a single-channel 2D or 3D array, got shape {image.shape}"
            )
        out = np.array(image, dtype=np.result_type(image.dtype, np.float32), copy=True)
        box = _place_box(image.shape, self._box_size(image.shape, rng), rng, center)
        region = np.zeros(image.shape, dtype=bool)
        region[box.slices] = self._corrupt(out, box, rng)
        return Corruption(name=self.name, image=out, region=region, box=box)

    def side_range(self, side: int) -> tuple[int, int]:
        """Inclusive range of box sides for an image side of ``side`` voxels."""
        high = max(1, int(side * self.max_fraction))
        return min(self.min_size, high), high

    def _box_size(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in map(self.side_range, shape))

    @abstractmethod
    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        """Corrupt ``out[box.slices]`` in place; return the changed region within the box (bool)."""


class Mask(HardAugmentation):
    """Seed 000 ``mask``: the area takes one random intensity in [0, 1].

    Seed 000's mask test set uses "two shapes"; we take a box and its inscribed ellipsoid.
    """

    name = "mask"
    SHAPES = ("box", "ellipsoid")

    def __init__(self, min_size: int = 10, max_fraction: float = 0.5, shapes: Sequence[str] = SHAPES) -> None:
        super().__init__(min_size, max_fraction)
        unknown = set(shapes) - set(self.SHAPES)
        if unknown or not shapes:
            raise ValueError(f"unknown mask shape(s) {sorted(unknown)!r}; known: {', '.join(self.SHAPES)}")
        self.shapes = tuple(shapes)

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        shape = self.shapes[int(rng.integers(len(self.shapes)))]
        value = rng.uniform(0.0, 1.0)
        inside = _ellipsoid_radius(box.size) <= 1.0 if shape == "ellipsoid" else np.ones(box.size, dtype=bool)
        out[box.slices][inside] = value
        return inside


class SobelFilter(HardAugmentation):
    """Seed 000 ``Sobel_filter``: the area is replaced by its Sobel gradient magnitude.

    The gradient is taken with one voxel of context around the box, so the box edges see their
    true neighbours, and rescaled to [0, 1] (the paper does not say how; edges become bright).
    """

    name = "sobel_filter"

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        lo = [max(0, b - 1) for b in box.start]
        hi = [min(n, b + s + 1) for n, b, s in zip(out.shape, box.start, box.size, strict=True)]
        context = out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].astype(np.float64)
        magnitude = np.sqrt(sum(ndimage.sobel(context, axis=a, mode="nearest") ** 2 for a in range(out.ndim)))
        inner = magnitude[
            tuple(slice(b - a, b - a + s) for a, b, s in zip(lo, box.start, box.size, strict=True))
        ]
        peak = inner.max()
        out[box.slices] = inner / peak if peak > 0 else inner
        return np.ones(box.size, dtype=bool)


class PatchRotation(HardAugmentation):
    """Seed 000 ``rotation``: the area is rotated in place.

    We rotate by 90, 180 or 270 degrees in a random plane (exact, no interpolation), so the box is
    square in that plane.
    """

    name = "rotation"

    def _box_size(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        return _square_in_a_plane(super()._box_size(shape, rng), rng)

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        # Any plane in which the box is square can be turned in; _box_size made at least one.
        planes = [p for p in itertools.combinations(range(out.ndim), 2) if box.size[p[0]] == box.size[p[1]]]
        plane = planes[int(rng.integers(len(planes)))]
        turns = int(rng.integers(1, 4))
        out[box.slices] = np.rot90(out[box.slices], k=turns, axes=plane).copy()
        return np.ones(box.size, dtype=bool)


class CopyPaste(HardAugmentation):
    """Seed 000 ``Copy-Paste``: a patch copied from another place of the image is pasted on the area."""

    name = "copy_paste"

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        source = box
        while source.start == box.start and any(n > s for n, s in zip(out.shape, box.size, strict=True)):
            source = _place_box(out.shape, box.size, rng, None)
        out[box.slices] = out[source.slices].copy()
        return np.ones(box.size, dtype=bool)


class RotatedCopyPaste(CopyPaste):
    """Copy-paste whose copied patch is turned by 90, 180 or 270 degrees in a random plane first.

    A training-only variant (seed 000's reference code alternates plain and rotated copy-paste when
    it synthesises training anomalies); it is not one of the six test types, so it is not in
    ``HARD_AUGMENTATIONS``. The box is square in the turning plane, as for ``PatchRotation``.
    """

    name = "copy_paste_rot"

    def _box_size(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        return _square_in_a_plane(HardAugmentation._box_size(self, shape, rng), rng)

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        source = _place_box(out.shape, box.size, rng, None)
        planes = [p for p in itertools.combinations(range(out.ndim), 2) if box.size[p[0]] == box.size[p[1]]]
        plane = planes[int(rng.integers(len(planes)))]
        out[box.slices] = np.rot90(out[source.slices], k=int(rng.integers(1, 4)), axes=plane).copy()
        return np.ones(box.size, dtype=bool)


class SubPatchPermutation(HardAugmentation):
    """Seed 000 ``permutation``: the area is split in halves along every axis (8 sub-patches in 3D,
    4 in 2D) and the sub-patches are shuffled (never the identity order)."""

    name = "permutation"

    def _box_size(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(max(2, s - s % 2) for s in super()._box_size(shape, rng))

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        patch = out[box.slices].copy()
        halves = [s // 2 for s in box.size]
        corners = list(itertools.product((0, 1), repeat=out.ndim))
        order = np.arange(len(corners))
        while np.array_equal(order, np.arange(len(corners))):
            order = rng.permutation(len(corners))
        target = out[box.slices]
        for dst, src in zip(corners, order, strict=True):
            src_corner = corners[int(src)]
            target[tuple(slice(c * h, (c + 1) * h) for c, h in zip(dst, halves, strict=True))] = patch[
                tuple(slice(c * h, (c + 1) * h) for c, h in zip(src_corner, halves, strict=True))
            ]
        return np.ones(box.size, dtype=bool)


class Scar(CopyPaste):
    """Seed 000 ``scar`` (CutPaste's scar, ref. [27]): copy-paste onto a very small, thin area.

    CutPaste's scar is a thin rectangle; ours is an axis-aligned rod: one random axis spans the
    usual box side range, the others ``thickness`` voxels.
    """

    name = "scar"

    def __init__(
        self, min_size: int = 10, max_fraction: float = 0.5, thickness: tuple[int, int] = (2, 4)
    ) -> None:
        super().__init__(min_size, max_fraction)
        if not 1 <= thickness[0] <= thickness[1]:
            raise ValueError(f"thickness must be an increasing pair of positive ints, got {thickness}")
        self.thickness = thickness

    def _box_size(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        long_axis = int(rng.integers(len(shape)))
        sizes = []
        for axis, side in enumerate(shape):
            if axis == long_axis:
                lo, hi = self.side_range(side)
            else:
                lo, hi = min(self.thickness[0], side), min(self.thickness[1], side)
            sizes.append(int(rng.integers(lo, hi + 1)))
        return tuple(sizes)


class IntensityBlob(HardAugmentation):
    """MOOD-style intensity blob: a smooth bright or dark ellipsoid added to the image.

    The profile ``amplitude * (1 - r^2)^2`` has compact support (r <= 1 in the box's inscribed
    ellipsoid), so the changed region is well defined; the result is clipped to [0, 1].
    """

    name = "intensity_blob"

    def __init__(
        self, min_size: int = 10, max_fraction: float = 0.5, amplitude: tuple[float, float] = (0.3, 0.7)
    ) -> None:
        super().__init__(min_size, max_fraction)
        self.amplitude = amplitude

    def _corrupt(self, out: np.ndarray, box: Box, rng: np.random.Generator) -> np.ndarray:
        radius = _ellipsoid_radius(box.size)
        inside = radius < 1.0
        amplitude = rng.uniform(*self.amplitude) * rng.choice((-1.0, 1.0))
        profile = np.where(inside, (1.0 - np.minimum(radius, 1.0) ** 2) ** 2, 0.0)
        out[box.slices] = np.clip(out[box.slices] + amplitude * profile, 0.0, 1.0)
        return inside


#: Seed 000's six hard augmentations, by the paper's names.
HARD_AUGMENTATIONS: dict[str, type[HardAugmentation]] = {
    cls.name: cls for cls in (Mask, SobelFilter, PatchRotation, CopyPaste, SubPatchPermutation, Scar)
}
#: Every local anomaly the embedded data uses: the six hard augmentations and the intensity blob.
LOCAL_ANOMALIES: dict[str, type[HardAugmentation]] = {**HARD_AUGMENTATIONS, IntensityBlob.name: IntensityBlob}


def hard_augmentation(name: str, **kwargs: object) -> HardAugmentation:
    """Build a local anomaly transform by name (see ``LOCAL_ANOMALIES``)."""
    if name not in LOCAL_ANOMALIES:
        raise ValueError(f"unknown hard augmentation {name!r}; known: {', '.join(LOCAL_ANOMALIES)}")
    return LOCAL_ANOMALIES[name](**kwargs)  # type: ignore[arg-type]


def _square_in_a_plane(size: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
    """``size`` with the sides of one random plane set to their minimum, so the box can turn in that plane."""
    size = list(size)
    plane = rng.choice(len(size), size=2, replace=False)
    side = min(size[a] for a in plane)
    for a in plane:
        size[a] = side
    return tuple(size)


def _place_box(
    shape: tuple[int, ...], size: Sequence[int], rng: np.random.Generator, center: Sequence[int] | None
) -> Box:
    """A box of ``size`` inside the image, centred on ``center`` (shifted to fit) or anywhere."""
    size = tuple(min(int(s), n) for s, n in zip(size, shape, strict=True))
    if center is None:
        start = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size, strict=True))
    else:
        start = tuple(
            int(np.clip(int(c) - s // 2, 0, n - s)) for c, s, n in zip(center, size, shape, strict=True)
        )
    return Box(start=start, size=size)


def _ellipsoid_radius(size: Sequence[int]) -> np.ndarray:
    """Normalised radius of every voxel of a box w.r.t. its inscribed ellipsoid (1 on the surface)."""
    grids = np.meshgrid(*[(np.arange(s) + 0.5 - s / 2) / (s / 2) for s in size], indexing="ij")
    return np.sqrt(sum(g**2 for g in grids))
