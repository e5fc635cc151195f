"""Shards -> model inputs: the one shard reader and the one preprocessing path.

``read_split`` turns a shard folder and a split into a streaming ``ray.data.Dataset`` of decoded
float32 arrays. ``prepare_sample`` is the preprocessing every consumer shares (training,
evaluation, serving): intensity scaling, the 2D-slice view of volumes, resizing to the method's
input size, random 3D patches. Because it is one function, a served score equals the score
``medood evaluate`` gives the same case.

Output rows (and batches) hold:
    image    float32 (C, *spatial), intensities in [0, 1]
    mask     float32 (1, *spatial), zeros where the case has no mask
    has_mask bool
    label    int64, 0 normal, 1 abnormal, -1 unknown
    id       str (slices: ``<case id>#<axis>:<index>``)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medood.platform.data.ingest import read_manifest
from medood.platform.data.schema import SPLITS, decode_affine, decode_image, decode_mask


@dataclass(frozen=True)
class InputSpec:
    """What a method consumes, and how volumes and images become that.

    spatial_dims: 2 or 3, the method's input dimensionality.
    image_size: side of the square / cube the method takes.
    in_channels: channels the method takes (gray images are repeated if it takes more).
    slice_axis: the axis of a stored volume that 2D methods slice along (numpy axis of the stored array).
    min_foreground: slices of a volume whose non-zero fraction is below this are left out (background).
    patch_size: 3D only: random cubic patches of this side instead of the whole resized volume (training).
    patches_per_volume: how many random patches one volume yields.
    intensity_percentiles: (low, high) percentiles mapped to [0, 1] per image / volume, clipped.
    """

    spatial_dims: int = 2
    image_size: int = 128
    in_channels: int = 1
    slice_axis: int = 2
    min_foreground: float = 0.05
    patch_size: int | None = None
    patches_per_volume: int = 1
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> InputSpec:
        """The spec for a method ``Config`` (its spatial_dims / image_size / in_channels) plus data options."""
        values = {k: getattr(config, k) for k in ("spatial_dims", "image_size", "in_channels")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown data option(s) {unknown}; known: {', '.join(sorted(known))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def shard_paths(shards: str | Path) -> list[str]:
    manifest = read_manifest(shards)
    return [str(Path(shards) / s["path"]) for s in manifest["shards"]]


def split_count(shards: str | Path, split: str) -> int:
    """Rows (cases) in a split, from the manifest."""
    return int(read_manifest(shards)["counts"].get(split, {}).get("total", 0))


def read_split(
    shards: str | Path,
    split: str,
    spec: InputSpec | None,
    *,
    training: bool = False,
    transforms: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    batch_size: int = 8,
):
    """A streaming ``ray.data.Dataset`` of one split, decoded (and, with a spec, preprocessed).

    spec: ``None`` yields the stored arrays as float32 without preprocessing (throughput tests).
    training: random patches (3D with ``patch_size``) and ``transforms`` apply only then.
    transforms: a MONAI dictionary transform (``keys=["image", "mask"]``) applied per sample,
        inside ``map_batches`` on the Ray Data workers.
    """
    import ray.data
    from ray.data.expressions import col

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    paths = shard_paths(shards)
    if not paths:
        raise ValueError(f"{shards}: the manifest lists no shards")
    # The predicate is pushed down to the Parquet reader (Arrow), so other splits are never decoded.
    ds = ray.data.read_parquet(paths).filter(expr=col("split") == split)
    return ds.map_batches(
        _prepare_batch_fn(spec, training, transforms, seed),
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
    )


def _prepare_batch_fn(
    spec: InputSpec | None, training: bool, transforms: Callable | None, seed: int
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return prepare_batch(batch, spec, training=training, transforms=transforms, seed=seed)

    return fn


def prepare_batch(
    batch: dict[str, np.ndarray],
    spec: InputSpec | None,
    *,
    training: bool = False,
    transforms: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Decode a batch of shard rows (numpy columns) into model-ready samples."""
    samples: list[dict[str, Any]] = []
    n = len(batch["id"])
    for i in range(n):
        row = {key: batch[key][i] for key in ("id", "shape", "dtype", "image", "mask", "label", "sha256")}
        image = decode_image(row)
        if spec is None:
            samples.append(
                {"image": image, "label": _label(row["label"]), "id": str(row["id"]), "has_mask": row["mask"] is not None}
            )
            continue
        mask = decode_mask(row)
        # Random draws depend on the case and the seed only, so a run is reproducible whatever the batching.
        rng = np.random.default_rng([seed, int(row["sha256"][:8], 16)]) if training else None
        samples.extend(
            prepare_sample(image, mask, _label(row["label"]), str(row["id"]), spec, rng=rng, transforms=transforms)
        )
    return collate(samples)


def prepare_sample(
    image: np.ndarray,
    mask: np.ndarray | None,
    label: int,
    case_id: str,
    spec: InputSpec,
    *,
    rng: np.random.Generator | None = None,
    transforms: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> list[dict[str, Any]]:
    """One stored image / volume -> the samples a method sees (one, or one per slice / patch).

    With ``rng`` (training) 3D patches are drawn at random and ``transforms`` apply; without it the
    output is deterministic, which is what evaluation and serving use.
    """
    from monai.transforms import Resize

    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"{case_id}: expected a 2D image or a 3D volume, got an array of shape {image.shape}")
    if image.ndim == 2 and spec.spatial_dims == 3:
        raise ValueError(f"{case_id}: a 3D method cannot take a 2D image of shape {image.shape}")
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"{case_id}: mask shape {mask.shape} differs from image shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError(f"{case_id}: the image holds {int((~np.isfinite(image)).sum())} NaN or infinite values")
    image = scale_intensity(image, spec.intensity_percentiles)
    mask_f = None if mask is None else (np.asarray(mask) > 0).astype(np.float32)

    views: list[tuple[str, np.ndarray, np.ndarray | None, int]] = []
    if image.ndim == 3 and spec.spatial_dims == 2:
        axis = spec.slice_axis
        for index in range(image.shape[axis]):
            plane = np.take(image, index, axis=axis)
            if spec.min_foreground > 0 and np.count_nonzero(plane > 1e-3) < spec.min_foreground * plane.size:
                continue
            plane_mask = None if mask_f is None else np.take(mask_f, index, axis=axis)
            plane_label = label if plane_mask is None else int(plane_mask.any())
            views.append((f"{case_id}#{axis}:{index:03d}", plane, plane_mask, plane_label))
    else:
        views.append((case_id, image, mask_f, label))

    size = (spec.image_size,) * spec.spatial_dims
    resize_image = Resize(size, mode="area" if spec.spatial_dims == 2 else "trilinear")
    resize_mask = Resize(size, mode="nearest")
    samples = []
    for view_id, view, view_mask, view_label in views:
        x = view[None]
        m = view_mask[None] if view_mask is not None else None
        if tuple(view.shape) != size:
            x = np.asarray(resize_image(x), dtype=np.float32)
            m = None if m is None else np.asarray(resize_mask(m), dtype=np.float32)
        if spec.in_channels > 1:
            x = np.repeat(x, spec.in_channels, axis=0)
        sample = {
            "image": x.astype(np.float32),
            "mask": m if m is not None else np.zeros((1, *size), dtype=np.float32),
            "has_mask": m is not None,
            "label": view_label,
            "id": view_id,
        }
        if rng is not None and spec.spatial_dims == 3 and spec.patch_size:
            samples.extend(_random_patches(sample, spec, rng))
        else:
            samples.append(sample)
    if rng is not None and transforms is not None:
        samples = [_apply_transforms(s, transforms) for s in samples]
    return samples


def scale_intensity(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the (low, high) percentiles of an image to [0, 1], clipped (MONAI's ScaleIntensityRangePercentiles)."""
    low, high = np.percentile(image, percentiles)
    if high - low < 1e-8:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """List of samples -> dict of stacked numpy columns (what ``map_batches`` returns)."""
    if not samples:
        return {"image": np.zeros((0,), np.float32), "label": np.zeros((0,), np.int64), "id": np.array([], dtype=object)}
    out: dict[str, np.ndarray] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "id":
            out[key] = np.array(values, dtype=object)
        elif key == "label":
            out[key] = np.asarray(values, dtype=np.int64)
        elif key == "has_mask":
            out[key] = np.asarray(values, dtype=bool)
        else:
            out[key] = np.stack(values) if _same_shapes(values) else _ragged(values)
    return out


def to_torch_batch(batch: dict[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """Numpy batch -> the ``Batch`` dict the methods take (tensors on ``device``; ids as a list)."""
    import torch

    out: dict[str, Any] = {
        "image": torch.as_tensor(_writable(batch["image"]), dtype=torch.float32, device=device),
        "label": torch.as_tensor(_writable(batch["label"]), dtype=torch.int64, device=device),
        "id": [str(i) for i in batch["id"]],
    }
    if "mask" in batch:
        out["mask"] = torch.as_tensor(_writable(batch["mask"]), dtype=torch.float32, device=device)
        out["has_mask"] = torch.as_tensor(_writable(batch["has_mask"]), dtype=torch.bool, device=device)
    return out


def read_cases(shards: str | Path, split: str, *, masks: bool = False) -> dict[str, dict[str, Any]]:
    """Per-case geometry of a split (id -> shape, affine, spacing, label, meta), without the pixel data.

    What writing predictions back in each input's space needs (the MOOD submission format). With
    ``masks=True`` each case also holds its ground-truth ``mask`` in the input's space (uint8, or
    ``None`` when the case has none), for pixel metrics computed on exactly what MOOD scores.
    """
    import json

    import ray.data
    from ray.data.expressions import col

    columns = ["id", "split", "shape", "affine", "spacing", "label", "meta"] + (["mask"] if masks else [])
    ds = ray.data.read_parquet(shard_paths(shards), columns=columns).filter(expr=col("split") == split)
    cases = {}
    for row in ds.iter_rows():
        case = {
            "shape": tuple(int(s) for s in row["shape"]),
            "affine": decode_affine(row),
            "spacing": None if row["spacing"] is None else tuple(float(s) for s in row["spacing"]),
            "label": _label(row["label"]),
            "meta": json.loads(row["meta"] or "{}"),
        }
        if masks:
            case["mask"] = decode_mask(row)
        cases[str(row["id"])] = case
    return cases


def _writable(array: np.ndarray) -> np.ndarray:
    """Ray Data hands out read-only arrays; torch needs writable memory (copy only then)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _label(value: Any) -> int:
    if value is None:
        return -1
    try:
        if np.isnan(value):
            return -1
    except TypeError:
        pass
    return int(value)


def _same_shapes(values: list[np.ndarray]) -> bool:
    return all(np.shape(v) == np.shape(values[0]) for v in values)


def _ragged(values: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _random_patches(sample: dict[str, Any], spec: InputSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    side = int(spec.patch_size)
    spatial = sample["image"].shape[1:]
    if any(side > s for s in spatial):
        raise ValueError(f"patch_size {side} exceeds the volume size {spatial}")
    patches = []
    for p in range(spec.patches_per_volume):
        start = [int(rng.integers(0, s - side + 1)) for s in spatial]
        window = tuple(slice(a, a + side) for a in start)
        patches.append(
            {
                **sample,
                "image": sample["image"][(slice(None), *window)],
                "mask": sample["mask"][(slice(None), *window)],
                "id": f"{sample['id']}@patch{p}",
            }
        )
    return patches


def _apply_transforms(sample: dict[str, Any], transforms: Callable) -> dict[str, Any]:
    out = transforms({"image": sample["image"], "mask": sample["mask"]})
    return {**sample, "image": np.asarray(out["image"], dtype=np.float32), "mask": np.asarray(out["mask"], dtype=np.float32)}
