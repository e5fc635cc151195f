"""The six hard augmentations of seed 000 (Sec. 4, Fig. 9) and the intensity blob, each alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medood.methods.components.hard_augmentations import (
    HARD_AUGMENTATIONS,
    LOCAL_ANOMALIES,
    Box,
    CopyPaste,
    IntensityBlob,
    Mask,
    PatchRotation,
    Scar,
    SobelFilter,
    SubPatchPermutation,
    changed_voxels,
    hard_augmentation,
)

SHAPES = [(32, 32), (24, 24, 24), (20, 28, 24)]


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_the_six_of_seed_000_and_the_blob_are_registered() -> None:
    assert list(HARD_AUGMENTATIONS) == [
        "mask",
        "sobel_filter",
        "rotation",
        "copy_paste",
        "permutation",
        "scar",
    ]
    assert list(LOCAL_ANOMALIES) == [*HARD_AUGMENTATIONS, "intensity_blob"]
    with pytest.raises(ValueError, match="unknown hard augmentation 'blur'; known: mask, sobel_filter"):
        hard_augmentation("blur")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(LOCAL_ANOMALIES))
def test_changes_only_inside_its_region(name: str, shape: tuple[int, ...]) -> None:
    image = _image(shape)
    original = image.copy()
    for seed in range(5):
        result = hard_augmentation(name).apply(image, np.random.default_rng(seed))
        assert result.image.shape == image.shape and result.image.dtype == np.float32
        assert result.region.shape == image.shape and result.region.dtype == bool
        changed = changed_voxels(image, result.image)
        assert changed.any()
        assert not (changed & ~result.region).any()
        in_box = np.zeros(shape, dtype=bool)
        in_box[result.box.slices] = True
        assert not (result.region & ~in_box).any()
        np.testing.assert_array_equal(result.anomaly_mask(image), changed)
        assert 0.0 <= result.image.min() and result.image.max() <= 1.0
    np.testing.assert_array_equal(image, original)  # the input is left alone


@pytest.mark.parametrize("name", list(LOCAL_ANOMALIES))
def test_deterministic_under_a_generator_and_callable(name: str) -> None:
    image = _image((24, 24, 24))
    transform = hard_augmentation(name)
    first = transform(image, np.random.default_rng(7))
    np.testing.assert_array_equal(first, transform(image, np.random.default_rng(7)))
    assert not np.array_equal(first, transform(image, np.random.default_rng(8)))


@pytest.mark.parametrize("name", list(LOCAL_ANOMALIES))
def test_box_sides_follow_seed_000(name: str) -> None:
    """10 voxels to half the input size per dimension (scar: thin on all but one axis)."""
    shape = (64, 48, 40)
    for seed in range(10):
        box = hard_augmentation(name).apply(_image(shape), np.random.default_rng(seed)).box
        if name == "scar":
            assert sorted(box.size)[:-1] <= [4, 4] and min(box.size) >= 2
            assert 10 <= max(box.size) <= 32
        else:
            assert all(min(10, n // 2) <= s <= n // 2 for s, n in zip(box.size, shape, strict=True)), box


def test_box_is_centred_on_the_given_centre() -> None:
    box = Mask().apply(_image((64, 64, 64)), np.random.default_rng(0), center=(30, 31, 32)).box
    for c, b, s in zip((30, 31, 32), box.start, box.size, strict=True):
        assert b <= c < b + s
    box = Mask().apply(_image((64, 64, 64)), np.random.default_rng(0), center=(0, 63, 0)).box
    assert box.start[0] == 0 and box.start[1] + box.size[1] == 64  # shifted to fit


def test_mask_gives_one_random_intensity() -> None:
    image = _image((24, 24, 24))
    for seed in range(6):
        result = Mask().apply(image, np.random.default_rng(seed))
        values = np.unique(result.image[result.region])
        assert len(values) == 1 and 0.0 <= values[0] <= 1.0
    shapes = {Mask(shapes=(s,)).apply(image, np.random.default_rng(0)).region.sum() for s in Mask.SHAPES}
    assert len(shapes) == 2  # box and its inscribed ellipsoid
    with pytest.raises(ValueError, match="unknown mask shape"):
        Mask(shapes=("star",))


def test_sobel_filter_gives_the_rescaled_gradient_magnitude() -> None:
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, 32, dtype=np.float32)[:, None], (32, 32)).copy()
    result = SobelFilter().apply(ramp, np.random.default_rng(0))
    patch = result.image[result.box.slices]
    np.testing.assert_allclose(patch, 1.0, atol=1e-6)  # a constant gradient, rescaled to 1
    flat = np.full((32, 32), 0.5, dtype=np.float32)
    np.testing.assert_array_equal(SobelFilter()(flat, np.random.default_rng(0))[result.box.slices] > 0, False)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotation_turns_the_patch_by_quarter_turns(shape: tuple[int, ...]) -> None:
    image = _image(shape)
    for seed in range(5):
        result = PatchRotation().apply(image, np.random.default_rng(seed))
        before, after = image[result.box.slices], result.image[result.box.slices]
        candidates = [
            np.rot90(before, k, plane)
            for plane in itertools.combinations(range(len(shape)), 2)
            for k in (1, 2, 3)
            if before.shape[plane[0]] == before.shape[plane[1]]
        ]
        assert any(np.array_equal(after, c) for c in candidates)


def test_copy_paste_pastes_a_patch_of_the_same_image() -> None:
    image = _image((32, 32))
    for seed in range(5):
        result = CopyPaste().apply(image, np.random.default_rng(seed))
        pasted = result.image[result.box.slices]
        h, w = pasted.shape
        sources = [
            (i, j)
            for i in range(32 - h + 1)
            for j in range(32 - w + 1)
            if np.array_equal(image[i : i + h, j : j + w], pasted)
        ]
        assert sources and all((i, j) != result.box.start for i, j in sources)


@pytest.mark.parametrize("shape,parts", [((32, 32), 4), ((24, 24, 24), 8)], ids=["2d", "3d"])
def test_permutation_shuffles_the_sub_patches(shape: tuple[int, ...], parts: int) -> None:
    image = _image(shape)
    for seed in range(5):
        result = SubPatchPermutation().apply(image, np.random.default_rng(seed))
        assert all(s % 2 == 0 for s in result.box.size)
        before, after = _sub_patches(image, result.box), _sub_patches(result.image, result.box)
        assert len(after) == parts
        order = [next(i for i, b in enumerate(before) if np.array_equal(a, b)) for a in after]
        assert sorted(order) == list(range(parts)) and order != list(range(parts))


def _sub_patches(volume: np.ndarray, box: Box) -> list[np.ndarray]:
    patch, halves = volume[box.slices], [s // 2 for s in box.size]
    return [
        patch[tuple(slice(c * h, (c + 1) * h) for c, h in zip(corner, halves, strict=True))]
        for corner in itertools.product((0, 1), repeat=volume.ndim)
    ]


def test_scar_is_a_thin_copy_paste() -> None:
    image = _image((64, 64, 64))
    for seed in range(5):
        result = Scar(thickness=(2, 3)).apply(image, np.random.default_rng(seed))
        thin = sorted(result.box.size)[:-1]
        assert all(2 <= t <= 3 for t in thin)
        assert result.region.sum() == np.prod(result.box.size)


def test_intensity_blob_is_a_smooth_ellipsoid() -> None:
    image = np.full((32, 32, 32), 0.5, dtype=np.float32)
    result = IntensityBlob().apply(image, np.random.default_rng(0))
    difference = result.image - image
    assert np.all(np.sign(difference[result.region]) == np.sign(difference[result.region].sum()))
    assert result.region.sum() < np.prod(result.box.size)  # an ellipsoid, not the whole box
    centre = tuple(b + s // 2 for b, s in zip(result.box.start, result.box.size, strict=True))
    assert abs(difference[centre]) == np.abs(difference).max() >= 0.2


def test_constant_image_changes_nothing_for_content_moving_augmentations() -> None:
    """Seed 000 Sec. 4: moved voxels that keep their value are not part of the OOD area."""
    flat = np.zeros((24, 24, 24), dtype=np.float32)
    for transform in (PatchRotation(), CopyPaste(), SubPatchPermutation(), Scar()):
        result = transform.apply(flat, np.random.default_rng(0))
        assert result.region.any() and not result.anomaly_mask(flat).any()
