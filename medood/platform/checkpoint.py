"""The one checkpoint format, and how a user names a model to load.

A checkpoint is a folder holding ``model.pt``: the method's own checkpoint (name, resolved config,
state dict; see ``medood.methods.base``) plus what the platform needs to score with it:

- ``calibration``: the monotone map of raw scores to [0, 1] fitted on normal training data
  (``0.5 * (1 + z / (1 + |z|))`` of ``z = (raw - mean) / std``) for samples and for maps, and the
  decision threshold chosen on the validation split in that [0, 1] space, with the rule that chose it. The MOOD writer, ``evaluate`` and serving share it.
- ``input_spec``: how cases were preprocessed (``InputSpec``), so serving does exactly the same.
- ``metrics``: validation metrics when the checkpoint was written.
- ``training_state``: stage, epoch and optimizer states, for resuming a run.

Everything is plain tensors / numbers / strings, so ``torch.load(weights_only=True)`` reads it.

``load(path)`` accepts a checkpoint folder, a ``model.pt``, a run folder (its best checkpoint, from
``run.json``) or a sweep's ``best.json``, each a local path or on object storage (``s3://...``, see
``medood.platform.storage``).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medood.methods.base import AnomalyMethod
from medood.platform.data.stream import InputSpec
from medood.platform.storage import Location, is_uri, location

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"
BEST_FILE = "best.json"


@dataclass
class Calibration:
    """Monotone map of raw scores to [0, 1] and the validation-chosen threshold in that space."""

    sample_mean: float = 0.0
    sample_std: float = 1.0
    map_mean: float = 0.0
    map_std: float = 1.0
    threshold: float = 0.5
    threshold_rule: str = "none"  # how ``threshold`` was chosen (``metrics.choose_threshold``'s sentence)
    fitted_on: int = 0  # normal training samples the statistics came from

    @staticmethod
    def fit(sample_scores: np.ndarray, map_values: np.ndarray | None = None) -> Calibration:
        sample_scores = np.asarray(sample_scores, dtype=np.float64)
        if sample_scores.size == 0:
            raise ValueError("cannot calibrate scores on an empty set of normal training samples")
        cal = Calibration(
            sample_mean=float(sample_scores.mean()),
            sample_std=float(max(sample_scores.std(), 1e-8)),
            fitted_on=int(sample_scores.size),
        )
        if map_values is not None and np.asarray(map_values).size:
            values = np.asarray(map_values, dtype=np.float64)
            cal.map_mean, cal.map_std = float(values.mean()), float(max(values.std(), 1e-8))
        return cal

    def sample(self, raw: np.ndarray | torch.Tensor) -> np.ndarray:
        return _unit_interval((_numpy(raw) - self.sample_mean) / self.sample_std)

    def map(self, raw: np.ndarray | torch.Tensor) -> np.ndarray:
        return _unit_interval((_numpy(raw) - self.map_mean) / self.map_std)


@dataclass
class LoadedModel:
    method: AnomalyMethod
    calibration: Calibration
    input_spec: InputSpec
    metrics: dict[str, float] = field(default_factory=dict)
    path: str = ""

    @property
    def name(self) -> str:
        return self.method.name


def save(
    directory: str | Path,
    method: AnomalyMethod,
    *,
    calibration: Calibration,
    input_spec: InputSpec,
    metrics: dict[str, float] | None = None,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/model.pt`` atomically (temporary name, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = method.to_checkpoint()
    payload["calibration"] = asdict(calibration)
    payload["input_spec"] = input_spec.to_dict()
    payload["metrics"] = {k: float(v) for k, v in (metrics or {}).items() if _is_number(v)}
    if training_state is not None:
        payload["training_state"] = training_state
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model-", suffix=".pt")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, directory / MODEL_FILE)
    return directory / MODEL_FILE


def read_payload(path: str | Path | Location) -> dict[str, Any]:
    """The raw checkpoint dict (weights only) at a resolved ``model.pt`` path or URI."""
    where = location(path)
    if where.is_local:
        return torch.load(where.path, map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(where.read_bytes()), map_location="cpu", weights_only=True)


def resolve(path: str | Path | Location) -> Path | str:
    """A user's model reference -> the ``model.pt`` it means: a local ``Path``, or a URI on object storage."""
    model_file = _resolve(location(path))
    return model_file.local_path() if model_file.is_local else model_file.uri


def _resolve(path: Location) -> Location:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, run folder or best.json")
    if path.is_file() and path.name.endswith(".json"):
        info = json.loads(path.read_text())
        if "checkpoint" not in info:
            raise ValueError(f"{path}: expected a 'checkpoint' entry (a sweep's best.json or a run's run.json)")
        target = str(info["checkpoint"])
        if is_uri(target) or (path.is_local and Path(target).is_absolute()):
            return _resolve(location(target))
        return _resolve(path.parent / target)  # relative to the json's folder, wherever that is
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    for name in (RUN_FILE, BEST_FILE):
        if (path / name).is_file():
            return _resolve(path / name)
    raise FileNotFoundError(
        f"{path}: not a checkpoint (no {MODEL_FILE}), a run folder (no {RUN_FILE}) or a sweep folder (no {BEST_FILE})"
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    model_file = _resolve(location(path))
    payload = read_payload(model_file)
    method = AnomalyMethod.from_checkpoint(payload).to(device)
    spec_values = dict(payload.get("input_spec") or {})
    if "intensity_percentiles" in spec_values:
        spec_values["intensity_percentiles"] = tuple(spec_values["intensity_percentiles"])
    spec = InputSpec(**spec_values) if spec_values else InputSpec.from_config(method.config)
    return LoadedModel(
        method=method,
        calibration=Calibration(**payload.get("calibration", {})),
        input_spec=spec,
        metrics=dict(payload.get("metrics", {})),
        path=model_file.uri,
    )


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit_interval(z: np.ndarray) -> np.ndarray:
    """Strictly increasing map of the real line onto (0, 1), 0.5 at the normal mean.

    A softsign rather than a sigmoid: a sigmoid rounds every score more than ~37 standard deviations
    above the normal mean to exactly 1.0, which ties clearly abnormal cases (reconstruction errors of
    anomalies are often that far out) and would make AUROC and thresholds computed on calibrated
    scores differ from those on raw scores. The softsign's tail decays like 1/z, so order survives.
    """
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + z / (1.0 + np.abs(z)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
