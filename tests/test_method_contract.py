"""The contract every registered method passes, automatically (no Ray).

Registers, presets resolve, a training step on a tiny batch lowers the loss over a few steps,
``score`` has the right shapes, and a checkpoint round trip through ``torch.load(weights_only=True)``
gives the same scores, and validation (calibration, val metrics, val loss) changes no state.
"""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch

from medood import methods
from medood.methods.base import AnomalyMethod, Stage
from medood.platform.train import fit_reference, step_optimizers, validate

ALL = methods.names()
TRAINABLE = [n for n in ALL if methods.get(n).trainable]
# Scoring options with state of their own (fitted in fit_reference), checked by the scoring tests too.
VARIANTS = {
    "autoencoder:map_reference=residual": ("autoencoder", {"map_reference": "residual"}),
    # The denoising autoencoder draws noise in training_step (seeded in eval mode) and median-filters its map.
    "autoencoder:denoising": ("autoencoder", {"map_reference": "residual", "noise_std": 0.2, "map_median": 3}),
}


# The contract is about behaviour, not size: joint_embedding's tiny preset feeds 16 slices of every
# volume to its 2D network (3 s per step on 2 CPUs); 4 slices exercise the same code.
CONTRACT_OVERRIDES = {"joint_embedding": {"n_slices": 4}}


def tiny(name: str) -> AnomalyMethod:
    torch.manual_seed(0)
    method, overrides = VARIANTS.get(name, (name, {}))
    return methods.get(method).build("tiny", **{**CONTRACT_OVERRIDES.get(method, {}), **overrides})


def batch_for(method: AnomalyMethod, n: int = 4) -> dict:
    c = method.config
    g = torch.Generator().manual_seed(1)
    shape = (n, c.in_channels) + (c.image_size,) * c.spatial_dims
    # Structured images (a bright square on a dark background) so there is something to learn.
    image = torch.rand(shape, generator=g) * 0.1
    centre = tuple(slice(c.image_size // 4, 3 * c.image_size // 4) for _ in range(c.spatial_dims))
    image[(slice(None), slice(None), *centre)] += 0.8
    return {"image": image, "label": torch.zeros(n, dtype=torch.long), "id": [f"case{i}" for i in range(n)]}


def test_registry_lists_the_methods():
    assert {"autoencoder", "squid", "mae_classifier", "pixel_mahalanobis", "voxel_zscore"} <= set(ALL)
    assert {"pixel_mahalanobis", "voxel_zscore"}.isdisjoint(TRAINABLE)
    with pytest.raises(ValueError, match="unknown method 'nope'; known: .*autoencoder"):
        methods.get("nope")


@pytest.mark.parametrize("name", ALL)
def test_presets_resolve_and_unknown_keys_are_named(name):
    cls = methods.get(name)
    assert {"paper", "tiny"} <= set(cls.presets)
    for preset in cls.presets:
        config = cls.make_config(preset)
        assert config.spatial_dims in (2, 3) and config.image_size > 0
    with pytest.raises(ValueError, match="unknown config key.*'not_a_field'.*valid keys: .*batch_size"):
        cls.make_config("tiny", {"not_a_field": 1})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        cls.make_config("huge")


@pytest.mark.parametrize("name", TRAINABLE)
def test_training_steps_lower_the_loss(name):
    method = tiny(name)
    batch = batch_for(method, n=2 if method.config.spatial_dims == 3 else 4)  # 3D steps are 8x the work
    stages = method.stages()
    assert stages and all(isinstance(s, Stage) and s.epochs >= 0 for s in stages)
    for stage in stages:
        method.train()
        optimizers = method.configure_optimizers(stage.name)
        assert "main" in optimizers

        def main_loss(stage=stage) -> float:
            # Mean over several evaluations: stochastic methods (masking, pseudo-anomalies) are noisy.
            torch.manual_seed(123)
            values = []
            with torch.no_grad():
                for _ in range(4):
                    losses = method.training_step(batch, stage.name)
                    if "loss" in losses:
                        values.append(float(losses["loss"]))
            return sum(values) / max(len(values), 1)

        before = main_loss()
        for _ in range(12):
            losses = method.training_step(batch, stage.name)
            assert all(torch.isfinite(v).all() for v in losses.values())
            step_optimizers(optimizers, losses)
        after = main_loss()
        assert after < before, f"{name}/{stage.name}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", ALL + list(VARIANTS))
def test_score_shapes_and_checkpoint_round_trip(name):
    method = tiny(name)
    batch = batch_for(method, n=3)
    method.train()
    for stage in method.stages():
        optimizers = method.configure_optimizers(stage.name)
        step_optimizers(optimizers, method.training_step(batch, stage.name))
    method.eval()
    method.fit_reference([batch])
    scores = method.score(batch)
    assert scores.sample.shape == (3,)
    assert torch.isfinite(scores.sample).all()
    if scores.map is not None:
        assert scores.map.shape == (3, 1) + batch["image"].shape[2:]

    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    restored = AnomalyMethod.from_checkpoint(payload)
    again = restored.score(batch)
    torch.testing.assert_close(again.sample, method.score(batch).sample)
    assert restored.config == method.config


class _Shard:
    """Stands in for a Ray Data shard: ``iter_batches`` yields numpy batches as ``read_split`` does."""

    def __init__(self, image: torch.Tensor, labels: list[int]) -> None:
        self.image, self.labels = image.numpy(), np.asarray(labels, dtype=np.int64)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for start in range(0, len(self.labels), batch_size):
            stop = start + batch_size
            ids = np.array([f"case{i}" for i in range(start, min(stop, len(self.labels)))], dtype=object)
            yield {"image": self.image[start:stop], "label": self.labels[start:stop], "id": ids}


@pytest.mark.parametrize("name", ALL + list(VARIANTS))
def test_validation_changes_no_state(name):
    """Validation, calibration and scoring leave parameters, buffers, queues, counters, mode and RNGs as they were."""
    method = tiny(name)
    normal = batch_for(method, n=6)
    val_image = torch.cat([normal["image"], batch_for(method, n=2)["image"].flip(-1) * 0.5])
    method.train()
    for stage in method.stages():  # train a little, so queues / EMA teachers / centres hold real values
        optimizers = method.configure_optimizers(stage.name)
        for _ in range(2):
            step_optimizers(optimizers, method.training_step(normal, stage.name))
    reference = _Shard(normal["image"], [0] * 6)
    val = _Shard(val_image, [0] * 6 + [1] * 2)
    fit_reference(method, reference, torch.device("cpu"), 4)
    assert method.training, "fit_reference must restore the training mode"
    stage = method.stages()[-1].name if method.stages() else None

    before = copy.deepcopy(method.state_dict())
    method.eval()
    scores_before = method.score(normal)
    method.train()
    rng_before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    metrics, calibration = validate(method, reference, val, torch.device("cpu"), False, 4, 64, stage=stage)
    assert method.training, "validate must restore the training mode"
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert np.array_equal(np.random.get_state()[1], rng_before[1]) and random.getstate() == rng_before[2]
    after = method.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{name}: validation changed {key}"
    method.eval()
    torch.testing.assert_close(method.score(normal).sample, scores_before.sample, rtol=0, atol=0)
    assert "val_auroc" in metrics and 0.0 <= calibration.threshold <= 1.0
    assert calibration.threshold_rule == "Youden's J"
    if stage is not None:
        assert np.isfinite(metrics["val_loss"])
