"""The embedded data sets (DESIGN.md "Embedded data"): synthetic-brain and DigitAnatomy, no Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medood.methods.components.hard_augmentations import LOCAL_ANOMALIES, MIN_ANOMALY_VOXELS, changed_voxels
from medood.platform.data.synthetic import (
    DIGIT_ANOMALIES,
    brain_template,
    corrupt_brain,
    digit_anatomy,
    digit_pools,
    normal_brain,
    synthesize,
)

BRAIN = {"n_train": 2, "n_test": 14, "size": 24}
DIGITS = {"n_train": 6, "n_test": 15, "size": 48}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def brain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brain")
    assert synthesize("synthetic-brain", root, seed=3, **BRAIN) == "mood"
    return root


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    assert synthesize("digitanatomy", root, seed=3, **DIGITS) == "folder"
    return root


def test_unknown_kind_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        synthesize("x", tmp_path)
    assert str(error.value) == "unknown synthetic dataset 'x'; known: digitanatomy, synthetic-brain"


# ---------------------------------------------------------------- synthetic-brain


def test_brain_files_follow_the_mood_layout(brain_root: Path) -> None:
    train = sorted((brain_root / "brain_train").iterdir())
    toy = sorted((brain_root / "toy").iterdir())
    assert [p.name for p in train] == ["00000.nii.gz", "00001.nii.gz"]
    assert len(toy) == 14
    assert sorted(p.name for p in (brain_root / "toy_label" / "pixel").iterdir()) == [p.name for p in toy]
    assert sorted(p.name for p in (brain_root / "toy_label" / "sample").iterdir()) == [
        f"{p.name}.txt" for p in toy
    ]
    for path in train + toy:
        image = nib.load(path)
        assert image.shape == (24, 24, 24) and image.get_data_dtype() == np.float32
        data = image.get_fdata()
        assert data.min() >= 0.0 and data.max() == pytest.approx(1.0, abs=0.35)
        spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
        assert np.allclose(spacing, spacing[0]) and 6.0 < spacing[0] < 10.0  # ~ 200 mm / 24
        np.testing.assert_allclose(image.header.get_zooms(), spacing, rtol=1e-5)


def test_brain_labels_agree_with_masks_and_every_type_appears(brain_root: Path) -> None:
    generation = json.loads((brain_root / "generation.json").read_text())
    assert generation["dataset"] == "synthetic-brain" and generation["layout"] == "mood"
    assert {k: generation[k] for k in BRAIN} == BRAIN
    test_cases = [c for c in generation["cases"] if c["role"] == "test"]
    assert Counter(c["anomaly"] for c in test_cases) == Counter(
        {"normal": 7, **dict.fromkeys(LOCAL_ANOMALIES, 1)}
    )
    for case in test_cases:
        name = Path(case["file"]).name
        mask = nib.load(brain_root / "toy_label" / "pixel" / name)
        assert mask.get_data_dtype() == np.uint8
        voxels = np.asarray(mask.dataobj)
        assert set(np.unique(voxels)) <= {0, 1}
        label = int((brain_root / "toy_label" / "sample" / f"{name}.txt").read_text().strip())
        assert label == int(voxels.any()) == case["label"] == int(case["anomaly"] != "normal")
        assert voxels.sum() == case["anomaly_voxels"]
        if label:
            assert voxels.sum() >= MIN_ANOMALY_VOXELS


def test_brain_masks_mark_only_changed_voxels_inside_the_brain() -> None:
    template = brain_template(24)
    for index, anomaly in enumerate(LOCAL_ANOMALIES):
        rng = np.random.default_rng(index)
        volume, brain = normal_brain(template, rng)
        assert volume.dtype == np.float32 and not volume[~brain].any()
        after, mask = corrupt_brain(volume, brain, anomaly, rng)
        np.testing.assert_array_equal(mask.astype(bool), changed_voxels(volume, after))
        assert mask.sum() >= MIN_ANOMALY_VOXELS and after.dtype == np.float32
        assert 0.0 <= after.min() and after.max() <= 1.0
        assert (mask.astype(bool) & brain).any()


def test_brain_normals_vary_around_the_template() -> None:
    template = brain_template(24)
    assert template.brain.mean() > 0.1
    first, _ = normal_brain(template, np.random.default_rng(0))
    second, _ = normal_brain(template, np.random.default_rng(1))
    assert np.abs(first - second).mean() > 0.01
    assert np.corrcoef(first.ravel(), template.image.ravel())[0, 1] > 0.8


def test_brain_is_deterministic_under_the_seed(brain_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize("synthetic-brain", again, seed=3, **BRAIN)
    assert _tree(again) == _tree(brain_root)
    other = tmp_path / "other"
    synthesize("synthetic-brain", other, seed=4, n_train=1, n_test=0, size=24)
    assert _tree(other)["brain_train/00000.nii.gz"] != _tree(brain_root)["brain_train/00000.nii.gz"]


# ---------------------------------------------------------------- digitanatomy


def test_digits_files_follow_the_folder_layout(digits_root: Path) -> None:
    normal = sorted(p.name for p in (digits_root / "normal").iterdir())
    abnormal = sorted(p.name for p in (digits_root / "abnormal").iterdir())
    assert sorted(p.name for p in (digits_root / "masks").iterdir()) == abnormal
    assert len(normal) == 6 + 3 and len(abnormal) == 12 and not set(normal) & set(abnormal)
    for folder, names in (("normal", normal), ("abnormal", abnormal), ("masks", abnormal)):
        for name in names:
            with Image.open(digits_root / folder / name) as image:
                assert image.format == "PNG" and image.mode == "L" and image.size == (48, 48)


def test_digits_labels_masks_and_types(digits_root: Path) -> None:
    generation = json.loads((digits_root / "generation.json").read_text())
    assert generation["layout"] == "folder" and generation["params"]["cell_size"] == 16
    cases = generation["cases"]
    assert all(c["anomaly"] == "normal" for c in cases if c["role"] == "train")
    test_types = Counter(c["anomaly"] for c in cases if c["role"] == "test")
    assert test_types == Counter(dict.fromkeys(("normal", *DIGIT_ANOMALIES), 3))  # Sec. 8.3 item 5
    for case in cases:
        assert case["file"].startswith("abnormal/" if case["label"] else "normal/")
        if case["label"]:
            mask = np.asarray(Image.open(digits_root / "masks" / Path(case["file"]).name))
            assert set(np.unique(mask)) == {0, 255}
            assert (mask > 0).sum() == case["anomaly_pixels"] >= MIN_ANOMALY_VOXELS


@pytest.mark.parametrize("anomaly", DIGIT_ANOMALIES)
def test_digit_masks_mark_the_changed_pixels_of_changed_cells(anomaly: str) -> None:
    pool = digit_pools()[1]
    for seed in range(4):
        # the abnormal image starts from the normal one the same generator draws (Sec. 8.3 item 4)
        normal, empty = digit_anatomy(48, pool, np.random.default_rng(seed))
        abnormal, mask = digit_anatomy(48, pool, np.random.default_rng(seed), anomaly)
        assert normal.shape == abnormal.shape == (48, 48) and not empty.any()
        np.testing.assert_array_equal(mask.astype(bool), changed_voxels(normal, abnormal))
        cells = {(int(i) // 16, int(j) // 16) for i, j in np.argwhere(mask)}
        expected = {"missing": {1}, "zero": {1}, "misorder": {2}, "flip": {1, 2, 3}}[anomaly]
        assert len(cells) in expected


def test_digits_normal_grid_reads_one_to_nine() -> None:
    """A normal image is 3x3 cells with digits 1-9 in reading order: every cell holds ink."""
    image, _ = digit_anatomy(128, digit_pools()[0], np.random.default_rng(0))
    assert image.shape == (128, 128) and 0.0 <= image.min() and image.max() <= 1.0
    offset = (128 - 3 * 42) // 2
    for row in range(3):
        for col in range(3):
            cell = image[
                offset + row * 42 : offset + (row + 1) * 42, offset + col * 42 : offset + (col + 1) * 42
            ]
            assert cell.max() > 0.5


def test_digits_are_deterministic_and_rewritable(digits_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize("digitanatomy", again, seed=3, **DIGITS)
    assert _tree(again) == _tree(digits_root)
    synthesize("digitanatomy", again, seed=3, n_train=1, n_test=2, size=48)  # replaces the earlier output
    assert len(list((again / "normal").iterdir())) + len(list((again / "abnormal").iterdir())) == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize("digitanatomy", foreign, n_train=1, n_test=2, size=48)
