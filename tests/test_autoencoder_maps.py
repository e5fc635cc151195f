"""The autoencoder's reference-standardised error map (``map_reference``): it points at a planted
anomaly, its statistics travel in the checkpoint, and scoring changes no state (no Ray)."""

from __future__ import annotations

import io

import pytest
import torch

from medood import methods
from medood.methods.base import AnomalyMethod


def normal_images(n: int, size: int, dims: int, seed: int = 0) -> torch.Tensor:
    """A bright centred square / cube with a random intensity scale and noise: normal anatomy."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    image = 0.2 + 0.03 * torch.randn(shape, generator=g)
    centre = tuple(slice(size // 4, 3 * size // 4) for _ in range(dims))
    image[(slice(None), slice(None), *centre)] += 0.4 + 0.05 * torch.randn((n, 1) + (1,) * dims, generator=g)
    return image.clamp(0, 1)


def build(dims: int, map_reference: str) -> AnomalyMethod:
    torch.manual_seed(0)
    if dims == 3:
        return methods.get("autoencoder").build("tiny3d", image_size=16, map_reference=map_reference)
    return methods.get("autoencoder").build("tiny", image_size=32, map_reference=map_reference)


def trained(dims: int, map_reference: str) -> tuple[AnomalyMethod, torch.Tensor]:
    method = build(dims, map_reference)
    size = method.config.image_size
    train = normal_images(24, size, dims)
    optimizer = method.configure_optimizers("train")["main"]
    method.train()
    for step in range(6):
        optimizer.zero_grad()
        method.training_step({"image": train[(step % 3) * 8:(step % 3 + 1) * 8]}, "train")["loss"].backward()
        optimizer.step()
    method.fit_reference([{"image": train[:12]}, {"image": train[12:]}])
    assert method.training, "fit_reference must leave the caller's mode as it was"
    method.eval()
    return method, train


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("map_reference", ["residual", "error"])
def test_standardised_map_peaks_inside_a_planted_anomaly(dims, map_reference):
    method, _ = trained(dims, map_reference)
    size = method.config.image_size
    test = normal_images(4, size, dims, seed=1)
    # A brighter box in a corner of the anatomy, off its centre: an intensity anomaly. (Bright: a dark
    # one can move a blurry reconstruction's squared error towards 0, which "error" does not flag.)
    box = (slice(size // 4, size // 4 + size // 4),) * dims
    test[(slice(1, 2), slice(None), *box)] += 0.35
    before = {k: v.clone() for k, v in method.state_dict().items()}
    scores = method.score({"image": test})
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), f"scoring changed {key}"
    assert scores.map.shape == (4, 1) + (size,) * dims
    assert int(scores.sample.argmax()) == 1
    peak = torch.unravel_index(scores.map[1, 0].argmax(), (size,) * dims)
    assert all(s.start <= int(p) < s.stop for p, s in zip(peak, box)), f"map peaks at {peak}, outside {box}"


def test_reference_buffers_survive_a_checkpoint_round_trip():
    method, train = trained(3, "residual")
    assert bool(method.reference_fitted) and float(method.reference_std.mean()) > 0
    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    for key in ("reference_mean", "reference_std", "reference_fitted"):
        assert torch.equal(getattr(restored, key), getattr(method, key)), key
    test = normal_images(3, method.config.image_size, 3, seed=2)
    torch.testing.assert_close(restored.score({"image": test}).map, method.score({"image": test}).map)


def test_raw_map_keeps_its_checkpoint_keys_and_unfitted_reference_refuses_to_score():
    paper = methods.get("autoencoder").build("tiny")
    assert not any(k.startswith("reference_") for k in paper.state_dict())
    method = build(2, "residual").eval()
    with pytest.raises(RuntimeError, match="fit_reference"):
        method.score({"image": normal_images(2, method.config.image_size, 2)})
    with pytest.raises(ValueError, match="map_reference"):
        methods.get("autoencoder").build("tiny", map_reference="pixel")
