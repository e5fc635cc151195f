"""The shard schema: one Parquet row per image (2D) or volume (3D).

Every producer (ingest of any layout) writes rows of exactly this schema and every consumer
(streaming to training, evaluation, serving tests) decodes them with ``decode_row``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=True),  # 0 normal, 1 abnormal, null unlabeled
        pa.field("group", pa.string(), nullable=False),  # pseudonymised patient id
        pa.field("shape", pa.list_(pa.int32()), nullable=False),  # (H, W) or (D, H, W) / (X, Y, Z)
        pa.field("spacing", pa.list_(pa.float32()), nullable=True),
        pa.field("dtype", pa.string(), nullable=False),  # numpy dtype name of `image`
        pa.field("image", pa.large_binary(), nullable=False),  # raw C-order bytes
        pa.field("mask", pa.large_binary(), nullable=True),  # uint8, same shape
        pa.field("affine", pa.list_(pa.float64()), nullable=True),  # 16 values, row-major 4x4
        pa.field("meta", pa.string(), nullable=False),  # JSON of whitelisted technical tags
        pa.field("sha256", pa.string(), nullable=False),  # of the image bytes
    ],
    metadata={"medood_schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class Record:
    """One row before it is written: arrays in memory, everything else plain values."""

    id: str
    dataset: str
    split: str
    label: int | None
    group: str
    image: np.ndarray
    mask: np.ndarray | None = None
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        image = np.ascontiguousarray(self.image)
        if self.mask is not None and tuple(self.mask.shape) != tuple(image.shape):
            raise ValueError(
                f"{self.id}: mask shape {tuple(self.mask.shape)} differs from image shape {tuple(image.shape)}"
            )
        data = image.tobytes(order="C")
        return {
            "id": self.id,
            "dataset": self.dataset,
            "split": self.split,
            "label": None if self.label is None else int(self.label),
            "group": self.group,
            "shape": [int(s) for s in image.shape],
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
            "dtype": image.dtype.name,
            "image": data,
            "mask": None
            if self.mask is None
            else np.ascontiguousarray(self.mask.astype(np.uint8)).tobytes(order="C"),
            "affine": None if self.affine is None else [float(v) for v in np.asarray(self.affine).reshape(-1)],
            "meta": json.dumps(self.meta, sort_keys=True),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def decode_image(row: dict[str, Any]) -> np.ndarray:
    """The stored image as float32 with its stored shape.

    A float32 image is a read-only view of ``row["image"]`` (no copy); other dtypes are converted once.
    """
    shape = tuple(int(s) for s in row["shape"])
    return np.frombuffer(row["image"], dtype=np.dtype(row["dtype"])).reshape(shape).astype(np.float32, copy=False)


def decode_mask(row: dict[str, Any]) -> np.ndarray | None:
    if row.get("mask") is None:
        return None
    shape = tuple(int(s) for s in row["shape"])
    return np.frombuffer(row["mask"], dtype=np.uint8).reshape(shape)


def decode_affine(row: dict[str, Any]) -> np.ndarray | None:
    if row.get("affine") is None:
        return None
    return np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)


#: Written by ``medood data synth`` next to the files it generates: parameters and, per file, its role,
#: label and anomaly type (ingest copies the type into each row's ``meta["anomaly"]``).
GENERATION_FILE = "generation.json"
