"""The one preprocessing path (no Ray): slices, resizing, patches, transforms, errors."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose, RandFlipd

from medood.platform.data.schema import SHARD_SCHEMA, Record
from medood.platform.data.stream import (
    InputSpec,
    augment_batch,
    case_map,
    collate,
    percentiles_of,
    prepare_batch,
    prepare_sample,
    scale_intensity,
    to_input_grid,
)


def volume(shape=(20, 24, 16)) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros(shape, np.float32)
    image[4:16, 4:20, 3:13] = 100.0
    mask = np.zeros(shape, np.uint8)
    mask[6:9, 6:9, 5:7] = 1
    return image, mask


def test_2d_view_of_a_volume_slices_along_the_axis_and_drops_background():
    image, mask = volume()
    spec = InputSpec(spatial_dims=2, image_size=32, slice_axis=2, min_foreground=0.05)
    samples = prepare_sample(image, mask, 1, "case", spec)
    indices = [int(s["id"].split(":")[1]) for s in samples]
    assert indices == list(range(3, 13))  # background slices 0-2 and 13-15 left out
    for s in samples:
        assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (1, 32, 32)
        assert s["image"].min() >= 0 and s["image"].max() <= 1
        assert s["label"] == int(s["mask"].any())  # slice label from its mask
    assert {s["label"] for s in samples} == {0, 1}


def test_3d_volume_is_resized_and_patches_are_random_only_when_training():
    image, mask = volume()
    spec = InputSpec(spatial_dims=3, image_size=16)
    (whole,) = prepare_sample(image, mask, 1, "v", spec)
    assert whole["image"].shape == (1, 16, 16, 16) and whole["label"] == 1
    patch_spec = InputSpec(spatial_dims=3, image_size=16, patch_size=8, patches_per_volume=3)
    rng = np.random.default_rng(0)
    patches = prepare_sample(image, mask, 1, "v", patch_spec, rng=rng)
    assert len(patches) == 3 and all(p["image"].shape == (1, 8, 8, 8) for p in patches)
    assert len(prepare_sample(image, mask, 1, "v", patch_spec)) == 1  # evaluation: whole volume


def test_preprocessing_is_deterministic_without_rng_and_transforms_apply_when_training():
    image = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    spec = InputSpec(spatial_dims=2, image_size=16)
    a = prepare_sample(image, None, 0, "x", spec)[0]["image"]
    b = prepare_sample(image, None, 0, "x", spec)[0]["image"]
    np.testing.assert_array_equal(a, b)
    flip = Compose([RandFlipd(keys=["image", "mask"], prob=1.0, spatial_axis=0)])
    flipped = prepare_sample(image, None, 0, "x", spec, rng=np.random.default_rng(0), transforms=flip)[0]["image"]
    np.testing.assert_allclose(flipped, a[:, ::-1, :])


def _box(shape, box) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    out[tuple(slice(a, b) for a, b in box)] = 1.0
    return out


def _extent(mask: np.ndarray) -> list[int]:
    """Side lengths of the bounding box of a mask's non-zero voxels."""
    nonzero = np.nonzero(mask > 0.5)
    return [int(ax.max() - ax.min() + 1) for ax in nonzero]


def test_pad_to_square_keeps_the_aspect_ratio_and_maps_back_to_the_input():
    # A 40 x 80 image holding a 20 x 20 square: stretched to 32 x 32 the square becomes 16 x 8; resized on
    # its longest side and padded it stays 8 x 8, inside the 16 content rows, with 8 zero rows above and below.
    shape = (40, 80)
    image = np.random.default_rng(0).random(shape).astype(np.float32) + 1.0
    square = _box(shape, [(10, 30), (30, 50)])
    stretched = InputSpec(spatial_dims=2, image_size=32)
    padded = InputSpec(spatial_dims=2, image_size=32, pad_to_square=True)
    (s,) = prepare_sample(image, square, 1, "x", stretched)
    (p,) = prepare_sample(image, square, 1, "x", padded)
    assert _extent(s["mask"][0]) == [16, 8]
    assert _extent(p["mask"][0]) == [8, 8]
    assert p["image"].shape == (1, 32, 32)
    assert not p["image"][0, :8].any() and not p["image"][0, 24:].any() and (p["image"][0, 8:24] > 0).mean() > 0.95
    # back to the input: the padding is cropped before resizing, so the map lands where the square was
    for spec, sample in ((stretched, s), (padded, p)):
        back = to_input_grid(sample["mask"][0], shape, spec)
        assert back.shape == shape
        overlap = ((back > 0.5) & (square > 0)).sum() / ((back > 0.5) | (square > 0)).sum()
        assert overlap > 0.85, (spec, overlap)
        np.testing.assert_array_equal(case_map([("x", sample["mask"][0])], shape, spec), back)
    # the padded map read as if it were stretched would misplace the square (what the crop prevents)
    wrong = to_input_grid(p["mask"][0], shape, stretched) > 0.5
    assert ((wrong & (square > 0)).sum() / (wrong | (square > 0)).sum()) < 0.6


def test_pad_to_square_on_volumes_and_on_the_slices_of_a_volume():
    shape = (20, 24, 16)
    blob = _box(shape, [(6, 14), (8, 16), (4, 12)])
    image = blob + np.random.default_rng(0).random(shape).astype(np.float32) + 1.0
    spec3 = InputSpec(spatial_dims=3, image_size=12, pad_to_square=True)
    (v,) = prepare_sample(image, blob, 1, "v", spec3)
    assert v["image"].shape == (1, 12, 12, 12)
    # 24 -> 12 on the longest axis: 20 -> 10 and 16 -> 8, padded (1, 1) and (2, 2)
    assert not v["image"][0, [0, 11]].any() and not v["image"][0, :, :, [0, 1, 10, 11]].any()
    assert (v["image"][0, 1:11, :, 2:10] > 0).mean() > 0.95  # the content (percentile scaling clips a few to 0)
    assert _extent(v["mask"][0]) == [4, 4, 4]
    back = case_map([("v", v["mask"][0])], shape, spec3)
    assert back.shape == shape and ((back > 0.5) == (blob > 0)).mean() > 0.97
    # a 2D method on the volume's axial slices: each 20 x 24 slice padded to 32 x 32 and placed back
    spec2 = InputSpec(spatial_dims=2, image_size=32, slice_axis=2, min_foreground=0.0, pad_to_square=True)
    samples = prepare_sample(image, blob, 1, "v", spec2)
    assert [s["image"].shape for s in samples] == [(1, 32, 32)] * 16
    # each (20, 24) slice -> (27, 32): 2 zero rows above and 3 below
    assert all(not s["image"][0, :2].any() and not s["image"][0, 29:].any() for s in samples)
    volume = case_map([(s["id"], s["mask"][0]) for s in samples[:12]], shape, spec2)
    assert volume.shape == shape and not volume[:, :, 12:].any()  # slices not given stay 0
    assert ((volume[:, :, :12] > 0.5) == (blob[:, :, :12] > 0)).mean() > 0.97


def test_in_channels_repeat_gray():
    spec = InputSpec(spatial_dims=2, image_size=8, in_channels=3)
    (s,) = prepare_sample(np.ones((8, 8)), None, 0, "x", spec)
    assert s["image"].shape == (3, 8, 8)


def test_bad_inputs_are_named():
    spec3 = InputSpec(spatial_dims=3, image_size=8)
    with pytest.raises(ValueError, match="case7: a 3D method cannot take a 2D image"):
        prepare_sample(np.ones((8, 8)), None, 0, "case7", spec3)
    with pytest.raises(ValueError, match="mask shape"):
        prepare_sample(np.ones((8, 8)), np.ones((4, 4)), 0, "m", InputSpec())
    with pytest.raises(ValueError, match="expected a 2D image or a 3D volume"):
        prepare_sample(np.ones((2, 2, 2, 2)), None, 0, "4d", InputSpec())
    with pytest.raises(ValueError, match="unknown data option"):
        InputSpec.from_config(type("C", (), {"spatial_dims": 2, "image_size": 8, "in_channels": 1})(), slice_axes=1)


def test_intensity_scaling_and_collate():
    x = np.linspace(0, 1000, 1001, dtype=np.float32)
    y = scale_intensity(x, (0.5, 99.5))
    assert y.min() == 0.0 and y.max() == 1.0
    assert np.all(scale_intensity(np.full(5, 3.0), (0.5, 99.5)) == 0)
    batch = collate(prepare_sample(np.ones((8, 8)), None, -1, "u", InputSpec(image_size=8)) * 2)
    assert batch["image"].shape == (2, 1, 8, 8) and batch["label"].tolist() == [-1, -1]


def test_fast_percentiles_are_numpys_and_scaling_matches_float64():
    rng = np.random.default_rng(0)
    brain = np.zeros((96, 96, 96), np.float32)  # mostly background: a constant low bracket
    brain[10:86, 12:84, 20:76] = rng.normal(100, 20, (76, 72, 56))
    skewed = rng.gamma(2.0, 50.0, (80, 80, 80)).astype(np.float32)
    ties = np.round(rng.normal(0, 3, (70, 70, 70))).astype(np.float32)
    for image in (brain, skewed, ties, rng.random((40, 50)).astype(np.float32)):
        for q in ((0.5, 99.5), (0.0, 100.0), (1.0, 99.0), (50.0, 50.5)):
            np.testing.assert_allclose(percentiles_of(image, q), np.percentile(image, q), rtol=1e-6, atol=1e-6)
        low, high = np.percentile(image, (0.5, 99.5))
        reference = np.clip((image.astype(np.float64) - low) / (high - low), 0.0, 1.0)
        scaled = scale_intensity(image, (0.5, 99.5))
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, reference, rtol=0, atol=1e-6)


def _shard_rows(n=3, shape=(12, 14, 10)):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        image = np.zeros(shape, np.float32)
        image[2:10, 2:12, 1:9] = rng.random((8, 10, 8)) * 50
        mask = None if i == 0 else (rng.random(shape) > 0.9).astype(np.uint8)
        rows.append(Record(f"c{i}", "toy", "train", i % 2, "g", image, mask=mask).to_row())
    return rows


def test_arrow_batches_decode_without_copies_and_as_numpy_rows_do():
    import pyarrow as pa

    rows = _shard_rows()
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    columns = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    for spec in (None, InputSpec(spatial_dims=2, image_size=8), InputSpec(spatial_dims=3, image_size=8)):
        a, b = prepare_batch(table, spec), prepare_batch(columns, spec)
        assert list(a["id"]) == list(b["id"]) and a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # a float32 image is a view of the Arrow buffer, not a copy
    from medood.platform.data.schema import decode_image
    from medood.platform.data.stream import _rows

    row = next(_rows(table))
    data = np.frombuffer(table.column("image").chunks[0].buffers()[2], np.uint8)
    assert np.shares_memory(decode_image(row), data) and row["mask"] is None


def test_augmenting_preprocessed_samples_draws_what_preprocessing_with_the_rng_draws():
    import pyarrow as pa

    rows = _shard_rows()
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    spec = InputSpec(spatial_dims=3, image_size=8, patch_size=4, patches_per_volume=2)
    base = prepare_batch(table, spec, seed_key=True)
    assert base["image"].shape == (3, 1, 8, 8, 8) and base["seed_key"].dtype == np.int64
    later = augment_batch(base, spec, seed=7)
    at_once = prepare_batch(table, spec, training=True, seed=7)
    assert "seed_key" not in later and list(later["id"]) == list(at_once["id"])
    np.testing.assert_array_equal(later["image"], at_once["image"])
    first = rows[0]
    rng = np.random.default_rng([7, int(first["sha256"][:8], 16)])
    image = np.frombuffer(first["image"], np.float32).reshape(first["shape"])
    direct = prepare_sample(image, None, 0, "c0", spec, rng=rng)
    np.testing.assert_array_equal(np.stack([d["image"] for d in direct]), later["image"][:2])
    assert not np.array_equal(augment_batch(base, spec, seed=8)["image"], later["image"])
