"""The two embedded data sets (DESIGN.md, "Embedded data"), generated offline with ground truth.

- ``synthetic-brain``: MOOD-like 3D brain MRI. Normal subjects are the MNI152 T1 template shipped
  in the nilearn wheel under a random smooth deformation, a bias field (MONAI ``RandBiasField``),
  a gamma intensity jitter (MONAI ``RandAdjustContrast``) and Rician noise. About half of the test subjects carry one local anomaly: one of the six
  hard augmentations of seed 000 (Sec. 4, Fig. 9) or an intensity blob, centred inside the brain.
  Written in the MOOD layout.
- ``digitanatomy``: DigitAnatomy of seed 003 (Sec. 3.8, Algorithm 1) built from scikit-learn's
  bundled 8x8 handwritten digits, following the recipe of notes/squid-thesis-003.md Sec. 8.3.
  Written in the ``folder`` layout.

Both are deterministic: the same arguments give byte-identical files. Every case draws from its
own generator seeded by ``(seed, stream, index)``, so e.g. changing ``n_train`` leaves the test
cases as they were. Volumes are stored as float32 in [0, 1] (what the masks were computed on).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medood.methods.components.hard_augmentations import (
    LOCAL_ANOMALIES,
    MIN_ANOMALY_VOXELS,
    changed_voxels,
    hard_augmentation,
)
from medood.platform.data.schema import GENERATION_FILE

SYNTHETIC_DATASETS = ("digitanatomy", "synthetic-brain")
#: Sizes used when ``synthesize`` gets ``None``: generate in a few seconds on 2 cores.
DEFAULTS: dict[str, dict[str, int]] = {
    "digitanatomy": {"n_train": 400, "n_test": 200, "size": 128},
    "synthetic-brain": {"n_train": 40, "n_test": 20, "size": 64},
}
#: The layout ``medood data ingest`` reads each data set with.
LAYOUTS = {"digitanatomy": "folder", "synthetic-brain": "mood"}
BRAIN_ANOMALIES = tuple(LOCAL_ANOMALIES)  # the six hard augmentations of seed 000 + intensity_blob
DIGIT_ANOMALIES = ("missing", "misorder", "flip", "zero")  # seed 003 Algorithm 1

# Stream ids of the per-case generators.
_TRAIN, _TEST = 0, 1
_MAX_REDRAWS = 100


def synthesize(
    kind: str,
    out: str | Path,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> str:
    """Write an embedded data set under ``out`` and return the layout name to ingest it with.

    ``synthetic-brain`` is written in the MOOD layout and returns ``"mood"``:
    ``brain_train/NNNNN.nii.gz`` (normal volumes), ``toy/NNNNN.nii.gz`` (normal and abnormal test
    volumes), ``toy_label/pixel/NNNNN.nii.gz`` (uint8 voxel masks) and
    ``toy_label/sample/NNNNN.nii.gz.txt`` (``0`` or ``1``). Test cases are numbered after the
    training ones, so every file stem is unique.

    ``digitanatomy`` is written in the folder layout and returns ``"folder"``:
    ``normal/NNNNN.png`` (the ``n_train`` training images, then the normal test cases),
    ``abnormal/NNNNN.png`` and ``masks/NNNNN.png`` (0/255, same name as the abnormal image).

    Both write ``generation.json`` with the parameters and, per file, its role (train/test),
    label and anomaly type. ``out`` must be empty, missing, or an earlier output of this function
    (which is then replaced).
    """
    if kind not in SYNTHETIC_DATASETS:
        raise ValueError(f"unknown synthetic dataset {kind!r}; known: {', '.join(SYNTHETIC_DATASETS)}")
    defaults = DEFAULTS[kind]
    n_train = defaults["n_train"] if n_train is None else int(n_train)
    n_test = defaults["n_test"] if n_test is None else int(n_test)
    size = defaults["size"] if size is None else int(size)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    root = _prepare_output(Path(out))
    if kind == "synthetic-brain":
        if not 16 <= size <= 256:
            raise ValueError(f"synthetic-brain size must be in [16, 256], got {size}")
        cases, params = _write_brain(root, n_train, n_test, size, seed, progress)
    else:
        if not 24 <= size <= 1024:
            raise ValueError(f"digitanatomy size must be in [24, 1024], got {size}")
        cases, params = _write_digitanatomy(root, n_train, n_test, size, seed, progress)
    generation = {
        "dataset": kind,
        "layout": LAYOUTS[kind],
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_test": n_test,
        "params": params,
        "cases": cases,
    }
    (root / GENERATION_FILE).write_text(json.dumps(generation, indent=1, sort_keys=True) + "\n")
    return LAYOUTS[kind]


# --------------------------------------------------------------------------------------------
# synthetic-brain


@dataclass(frozen=True)
class BrainConfig:
    """How a normal subject varies around the MNI152 template, and how big anomalies are.

    Args:
        max_rotation: largest rotation about each axis, radians.
        max_scaling: largest relative scaling per axis.
        max_translation: largest shift per axis, as a fraction of the field of view.
        deformation_grid: control points per axis of the random displacement field.
        deformation_magnitude: std of the control-point displacements, fraction of the field of view.
        bias_coefficients: range of the Legendre coefficients of MONAI's ``RandBiasField`` (degree 3).
        gamma: range of the contrast gamma of MONAI's ``RandAdjustContrast``.
        noise_std: the Rician noise std is drawn uniformly in [0, noise_std] (as MONAI's
            ``RandRicianNoise(sample_std=True)``).
        anomaly_fraction: share of the test subjects that carry an anomaly.
        anomaly_min_size: smallest box side of an anomaly (seed 000 Sec. 4: 10 voxels at 64^3).
        anomaly_max_fraction: largest box side as a fraction of the volume (seed 000: half).
    """

    max_rotation: float = 0.12
    max_scaling: float = 0.08
    max_translation: float = 0.03
    deformation_grid: int = 5
    deformation_magnitude: float = 0.012
    bias_coefficients: tuple[float, float] = (0.0, 0.15)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.03
    anomaly_fraction: float = 0.5
    anomaly_min_size: int = 10
    anomaly_max_fraction: float = 0.5


@dataclass(frozen=True)
class BrainTemplate:
    """The MNI152 T1 template on a ``size^3`` grid: intensities in [0, 1], brain mask, affine."""

    image: np.ndarray  # float32 (size, size, size)
    brain: np.ndarray  # bool
    affine: np.ndarray  # 4x4, RAS mm


@functools.lru_cache(maxsize=4)
def brain_template(size: int) -> BrainTemplate:
    """The nilearn MNI152 T1 template (1 mm, skull-stripped), as a cube around the brain, resized.

    The cube is centred on the brain's bounding box and 15% larger than its longest side, so that
    deformed subjects stay inside the field of view: 209 mm, so 3.27 mm voxels at size 64, 0.82 mm
    at 256. The arrays are shared by the cache and read-only.
    """
    image, affine = _load_mni152()
    brain = image > 0
    lo = np.array([idx.min() for idx in np.nonzero(brain)])
    hi = np.array([idx.max() + 1 for idx in np.nonzero(brain)])
    side = int(np.ceil((hi - lo).max() * 1.15))
    start = (lo + hi) // 2 - side // 2
    cube = np.zeros((side,) * 3, dtype=np.float32)
    src = tuple(slice(max(0, b), min(n, b + side)) for b, n in zip(start, image.shape, strict=True))
    dst = tuple(slice(s.start - b, s.stop - b) for s, b in zip(src, start, strict=True))
    cube[dst] = image[src]
    mode = "area" if size < side else "trilinear"
    stack = torch.from_numpy(np.stack([cube, (cube > 0).astype(np.float32)]))[None]
    kwargs = {} if mode == "area" else {"align_corners": False}
    resized = F.interpolate(stack, size=(size,) * 3, mode=mode, **kwargs)[0].numpy()
    # voxel j of the new grid sits at old voxel (j + 0.5) * side / size - 0.5 (half-pixel centres)
    scale = side / size
    grid_to_cube = np.diag([scale, scale, scale, 1.0])
    grid_to_cube[:3, 3] = 0.5 * scale - 0.5 + start
    template = np.clip(resized[0], 0.0, None)
    template = (template / template.max()).astype(np.float32)
    brain_mask = resized[1] > 0.5
    for array in (template, brain_mask):
        array.setflags(write=False)
    return BrainTemplate(image=template, brain=brain_mask, affine=affine @ grid_to_cube)


def normal_brain(
    template: BrainTemplate, rng: np.random.Generator, config: BrainConfig = BrainConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """One normal subject: (volume float32 in [0, 1] with zero background, brain mask)."""
    from monai.transforms import RandAdjustContrast, RandBiasField

    size = template.image.shape[0]
    stack = torch.from_numpy(np.stack([template.image, template.brain.astype(np.float32)]))[None]
    warped = F.grid_sample(
        stack,
        _random_warp_grid(size, rng, config),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0].numpy()
    brain = warped[1] > 0.5
    volume = np.clip(warped[:1], 0.0, 1.0)
    for transform in (
        RandBiasField(degree=3, coeff_range=config.bias_coefficients, prob=1.0),
        RandAdjustContrast(gamma=config.gamma, prob=1.0),
    ):
        transform.set_random_state(seed=int(rng.integers(2**31)))
        volume = _as_numpy(transform(volume))
    volume = _rician_noise(volume, rng.uniform(0.0, config.noise_std), rng)
    # zero intensity outside the brain, as seed 000 Sec. 4 preprocesses its images, so that
    # background-to-background copies change nothing and are not labelled
    volume = np.where(brain, np.clip(volume[0], 0.0, None), 0.0)
    volume /= max(float(volume.max()), 1e-6)
    return volume.astype(np.float32), brain


def corrupt_brain(
    volume: np.ndarray,
    brain: np.ndarray,
    anomaly: str,
    rng: np.random.Generator,
    config: BrainConfig = BrainConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """One local anomaly of type ``anomaly`` centred in the brain: (volume float32, mask uint8).

    The mask marks only voxels that changed; a synthesis with fewer than ``MIN_ANOMALY_VOXELS``
    changed voxels is redrawn (seed 000 Sec. 4).
    """
    transform = hard_augmentation(
        anomaly, min_size=config.anomaly_min_size, max_fraction=config.anomaly_max_fraction
    )
    centres = np.argwhere(brain)
    for _ in range(_MAX_REDRAWS):
        centre = centres[int(rng.integers(len(centres)))]
        corruption = transform.apply(volume, rng, center=centre)
        after = np.clip(corruption.image, 0.0, 1.0).astype(np.float32)
        mask = changed_voxels(volume, after, corruption.region)
        if mask.sum() >= MIN_ANOMALY_VOXELS:
            return after, mask.astype(np.uint8)
    raise RuntimeError(f"{anomaly}: no anomaly of >= {MIN_ANOMALY_VOXELS} voxels in {_MAX_REDRAWS} draws")


def _write_brain(
    root: Path, n_train: int, n_test: int, size: int, seed: int, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config = BrainConfig()
    template = brain_template(size)
    affine = template.affine
    for folder in ("brain_train", "toy", "toy_label/pixel", "toy_label/sample"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = _test_plan(np.random.default_rng([seed, _TEST]), n_test, config.anomaly_fraction, BRAIN_ANOMALIES)
    cases: list[dict[str, Any]] = []
    jobs = [("train", i, None) for i in range(n_train)] + [("test", i, a) for i, a in enumerate(plan)]
    for role, index, anomaly in _track(jobs, progress, "synthetic-brain"):
        stream = _TRAIN if role == "train" else _TEST
        rng = np.random.default_rng([seed, stream, index, 1])
        volume, brain = normal_brain(template, rng, config)
        name = f"{index if role == 'train' else n_train + index:05d}.nii.gz"
        if role == "train":
            _save_nifti(volume, affine, root / "brain_train" / name)
            cases.append({"file": f"brain_train/{name}", "role": role, "label": 0, "anomaly": "normal"})
            continue
        mask = np.zeros(volume.shape, dtype=np.uint8)
        if anomaly != "normal":
            volume, mask = corrupt_brain(volume, brain, anomaly, rng, config)
        label = int(mask.any())
        _save_nifti(volume, affine, root / "toy" / name)
        _save_nifti(mask, affine, root / "toy_label" / "pixel" / name)
        (root / "toy_label" / "sample" / f"{name}.txt").write_text(str(label))
        cases.append(
            {
                "file": f"toy/{name}",
                "role": role,
                "label": label,
                "anomaly": anomaly,
                "anomaly_voxels": int(mask.sum()),
            }
        )
    spacing = [float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    params = {
        "source": "nilearn MNI152 T1 template (mni_icbm152_t1_tal_nlin_sym_09a), 1 mm",
        "dtype": "float32",
        "spacing_mm": spacing,
        "anomalies": list(BRAIN_ANOMALIES),
        "min_anomaly_voxels": MIN_ANOMALY_VOXELS,
        "config": _jsonable(config.__dict__),
    }
    return cases, params


def _load_mni152() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 T1 template in [0, 1] and its affine, from the nilearn package data (offline)."""
    from nilearn import datasets

    try:
        image = datasets.load_mni152_template(resolution=1)
    except (TypeError, OSError):  # older nilearn: no resolution argument; read the packaged file
        path = Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        image = nib.load(path)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    data = np.clip(data, 0.0, None)
    return data / data.max(), np.asarray(image.affine, dtype=np.float64)


def _random_warp_grid(size: int, rng: np.random.Generator, config: BrainConfig) -> torch.Tensor:
    """Sampling grid of a random affine map plus a smooth random displacement field.

    Both are evaluated on a coarse control grid and upsampled trilinearly, which is exact for the
    affine part: as smooth as MONAI's ``Rand3DElastic`` but O(size^3) instead of a full-resolution
    Gaussian smoothing, so 256^3 volumes stay cheap. Coordinates are normalised to [-1, 1] and
    ordered (x, y, z) = (W, H, D), as ``grid_sample(align_corners=False)`` expects.
    """
    angles = rng.uniform(-config.max_rotation, config.max_rotation, 3)
    scales = 1.0 + rng.uniform(-config.max_scaling, config.max_scaling, 3)
    shift = rng.uniform(-2 * config.max_translation, 2 * config.max_translation, 3)
    linear = _rotation_matrix(angles) @ np.diag(1.0 / scales)
    n = config.deformation_grid
    displacement = rng.normal(0.0, 2 * config.deformation_magnitude, (n, n, n, 3))
    # control points on the centres of the first and last voxels along each axis
    axis = np.linspace(-1.0 + 1.0 / size, 1.0 - 1.0 / size, n)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")[::-1], axis=-1)
    coarse = points @ linear.T + shift + displacement
    coarse_t = torch.from_numpy(coarse.astype(np.float32)).permute(3, 0, 1, 2)[None]
    grid = F.interpolate(coarse_t, size=(size,) * 3, mode="trilinear", align_corners=True)
    return grid[0].permute(1, 2, 3, 0)[None]


def _rician_noise(volume: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """MR magnitude noise, sqrt((x + n1)^2 + n2^2) with n1, n2 ~ N(0, std^2) (what MONAI's
    ``RandRicianNoise`` computes; drawn here from our generator in float32, several times faster)."""
    real = volume + std * rng.standard_normal(volume.shape, dtype=np.float32)
    imaginary = std * rng.standard_normal(volume.shape, dtype=np.float32)
    return np.sqrt(real**2 + imaginary**2)


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)  # scanner coordinates
    image.header.set_sform(affine, code=4)  # MNI152
    # nibabel writes gzip with mtime 0, so equal arrays give byte-identical files
    nib.save(image, str(path))


# --------------------------------------------------------------------------------------------
# digitanatomy


@dataclass(frozen=True)
class DigitAnatomyConfig:
    """DigitAnatomy recipe (seed 003 Algorithm 1; notes/squid-thesis-003.md Sec. 8.3).

    Args:
        digit_scale: a normal digit fills this fraction of its cell side, drawn per cell (the
            per-cell size jitter of the authors' code, Sec. 8.3 item 2 [C]).
        flip_cells: how many cells a ``flip`` anomaly flips (Sec. 8.3 item 4: 1 to 3).
    """

    digit_scale: tuple[float, float] = (0.65, 0.95)
    flip_cells: tuple[int, int] = (1, 3)


@functools.lru_cache(maxsize=1)
def digit_pools() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """scikit-learn's 8x8 digits in [0, 1], by label, split in two disjoint halves per label.

    Sec. 8.3 item 1 uses MNIST train for training and MNIST test for val/test; scikit-learn's set
    has no split, so the first half of each label's images feeds training, the second the tests.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train, test = {}, {}
    for label in range(10):
        group = images[digits.target == label]
        train[label], test[label] = group[: len(group) // 2], group[len(group) // 2 :]
    return train, test


def digit_anatomy(
    size: int,
    pool: dict[int, np.ndarray],
    rng: np.random.Generator,
    anomaly: str = "normal",
    config: DigitAnatomyConfig = DigitAnatomyConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """One DigitAnatomy image (float32 ``size`` x ``size`` in [0, 1]) and its mask (uint8 0/1).

    The image is 3x3 equal cells of side ``size // 3``, digits 1-9 in reading order (Sec. 8.3
    item 2), centred on the canvas. An abnormal image starts from a normal one and changes a few
    cells with one anomaly type (Sec. 8.3 item 4); the mask marks the changed pixels after 8-bit
    quantisation, so it matches the PNG written.
    """
    if anomaly != "normal" and anomaly not in DIGIT_ANOMALIES:
        raise ValueError(
            f"unknown DigitAnatomy anomaly {anomaly!r}; known: normal, {', '.join(DIGIT_ANOMALIES)}"
        )
    cell = size // 3
    cells = [_render_digit(_pick(pool[d], rng), cell, rng, config) for d in range(1, 10)]
    normal = _quantise(_assemble(cells, size))
    if anomaly == "normal":
        return normal, np.zeros_like(normal, dtype=np.uint8)
    for _ in range(_MAX_REDRAWS):
        abnormal = _quantise(_assemble(_corrupt_cells(cells, anomaly, pool, rng, config), size))
        mask = changed_voxels(normal, abnormal)
        if mask.sum() >= MIN_ANOMALY_VOXELS:
            return abnormal, mask.astype(np.uint8)
    raise RuntimeError(f"{anomaly}: no DigitAnatomy anomaly changed >= {MIN_ANOMALY_VOXELS} pixels")


def _corrupt_cells(
    cells: list[np.ndarray],
    anomaly: str,
    pool: dict[int, np.ndarray],
    rng: np.random.Generator,
    config: DigitAnatomyConfig,
) -> list[np.ndarray]:
    """Sec. 8.3 item 4: one anomaly type per image, applied to m cells chosen without replacement."""
    cells = list(cells)
    cell = cells[0].shape[0]
    if anomaly == "missing":  # "missing digit": m = 1, a blank cell
        cells[int(rng.integers(9))] = np.zeros((cell, cell), dtype=np.float32)
    elif anomaly == "zero":  # "inclusion of digit zero": m = 1, a random "0"
        cells[int(rng.integers(9))] = _render_digit(_pick(pool[0], rng), cell, rng, config)
    elif anomaly == "flip":  # "flipped digit(s)": m in 1..3 (Sec. 8.3 item 4)
        m = int(rng.integers(config.flip_cells[0], config.flip_cells[1] + 1))
        for p in rng.choice(9, size=m, replace=False):
            # Sec. 8.2 gap 3: the flip axis is not stated; left-right or up-down, per cell (Sec. 8.3 item 4)
            cells[p] = np.flip(cells[p], axis=int(rng.integers(2))).copy()
    else:  # "misordered digits": two cells exchange their digits (the swap variant of Sec. 8.3 item 4,
        # which never re-draws the correct digit, Sec. 8.2 gap 4)
        a, b = rng.choice(9, size=2, replace=False)
        cells[a], cells[b] = cells[b], cells[a]
    return cells


def _write_digitanatomy(
    root: Path, n_train: int, n_test: int, size: int, seed: int, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config = DigitAnatomyConfig()
    train_pool, test_pool = digit_pools()
    for folder in ("normal", "abnormal", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # Sec. 8.3 item 5: class-balanced test cases, normal and each anomaly type in equal shares.
    plan = _test_plan(np.random.default_rng([seed, _TEST]), n_test, 0.8, DIGIT_ANOMALIES)
    jobs = [("train", i, "normal") for i in range(n_train)] + [("test", i, a) for i, a in enumerate(plan)]
    cases: list[dict[str, Any]] = []
    for role, index, anomaly in _track(jobs, progress, "digitanatomy"):
        stream = _TRAIN if role == "train" else _TEST
        rng = np.random.default_rng([seed, stream, index, 1])
        pool = train_pool if role == "train" else test_pool
        image, mask = digit_anatomy(size, pool, rng, anomaly, config)
        name = f"{index if role == 'train' else n_train + index:05d}.png"
        folder = "normal" if anomaly == "normal" else "abnormal"
        _save_png(image, root / folder / name)
        if anomaly != "normal":
            _save_png(mask.astype(np.float32), root / "masks" / name)
        cases.append(
            {
                "file": f"{folder}/{name}",
                "role": role,
                "label": int(anomaly != "normal"),
                "anomaly": anomaly,
                "anomaly_pixels": int(mask.sum()),
            }
        )
    params = {
        "source": "scikit-learn load_digits (8x8, 1797 images), halves per digit for train / test",
        "cell_size": size // 3,
        "anomalies": list(DIGIT_ANOMALIES),
        "min_anomaly_pixels": MIN_ANOMALY_VOXELS,
        "config": _jsonable(config.__dict__),
    }
    return cases, params


def _pick(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images[int(rng.integers(len(images)))]


def _render_digit(
    digit: np.ndarray, cell: int, rng: np.random.Generator, config: DigitAnatomyConfig
) -> np.ndarray:
    """An 8x8 digit upsampled (bicubic) to a random fraction of the cell, placed at a random offset."""
    side = max(8, int(round(cell * rng.uniform(*config.digit_scale))))
    side = min(side, cell)
    up = Image.fromarray(digit.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BICUBIC)
    canvas = np.zeros((cell, cell), dtype=np.float32)
    top, left = (int(rng.integers(0, cell - side + 1)) for _ in range(2))
    canvas[top : top + side, left : left + side] = np.clip(np.asarray(up), 0.0, 1.0)
    return canvas


def _assemble(cells: list[np.ndarray], size: int) -> np.ndarray:
    """Cells 1-9 in reading order on a ``size`` x ``size`` canvas, the 3x3 grid centred."""
    cell = cells[0].shape[0]
    grid = np.block([cells[0:3], cells[3:6], cells[6:9]])
    canvas = np.zeros((size, size), dtype=np.float32)
    offset = (size - 3 * cell) // 2
    canvas[offset : offset + 3 * cell, offset : offset + 3 * cell] = grid
    return canvas


def _quantise(image: np.ndarray) -> np.ndarray:
    """Round to the 8-bit levels of the PNG, so masks are computed on what is written."""
    return (np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _save_png(image: np.ndarray, path: Path) -> None:
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path, format="PNG")


# --------------------------------------------------------------------------------------------
# shared helpers

_T = TypeVar("_T")


def _test_plan(
    rng: np.random.Generator, n_test: int, anomaly_fraction: float, anomalies: tuple[str, ...]
) -> list[str]:
    """The anomaly type of each test case ("normal" for none), in a shuffled order.

    At least one normal and one abnormal case when ``n_test >= 2`` (so val and test both get
    both); abnormal cases cycle through ``anomalies`` from a random start, so every type appears
    once there are at least as many abnormal cases as types.
    """
    n_abnormal = int(round(n_test * anomaly_fraction))
    if n_test >= 2:
        n_abnormal = min(max(n_abnormal, 1), n_test - 1)
    order = rng.permutation(len(anomalies))
    plan = ["normal"] * (n_test - n_abnormal) + [
        anomalies[order[k % len(anomalies)]] for k in range(n_abnormal)
    ]
    return [plan[i] for i in rng.permutation(n_test)]


def _track(jobs: list[_T], progress: bool, label: str) -> Iterable[_T]:
    if not progress:
        return jobs
    from rich.progress import track

    return track(jobs, description=f"synthesising {label}")


def _prepare_output(root: Path) -> Path:
    """Make ``root`` ready: missing or empty, or an earlier synthesize output, which is cleared."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not (root / GENERATION_FILE).is_file():
            raise FileExistsError(
                f"{root} is not empty and holds no {GENERATION_FILE}; choose an empty folder"
            )
        for owned in ("brain_train", "toy", "toy_label", "normal", "abnormal", "masks", GENERATION_FILE):
            path = root / owned
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _as_numpy(data: Any) -> np.ndarray:
    return data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def iter_cases(root: str | Path) -> Iterator[dict[str, Any]]:
    """The per-file records of a ``generation.json`` written by ``synthesize``."""
    yield from json.loads((Path(root) / GENERATION_FILE).read_text())["cases"]
