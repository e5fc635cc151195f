"""The autoencoder's reference-standardised error map (``map_reference``): it points at a planted
anomaly, its statistics travel in the checkpoint, and scoring changes no state (no Ray)."""

from __future__ import annotations

import io

import pytest
import torch
from monai.networks.layers import median_filter

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


def test_denoising_corrupts_the_input_with_coarse_noise_and_keeps_the_target_clean():
    torch.manual_seed(0)
    method = methods.get("autoencoder").build("tiny3d", image_size=32, noise_std=0.2, noise_downsample=8)
    image = normal_images(2, 32, 3)
    method.train()
    torch.manual_seed(7)
    noise = method.coarse_noise(image)
    # Coarse: drawn on a 4^3 grid and upsampled, so neighbours differ far less than in white noise.
    assert noise.shape == image.shape
    assert 0.05 < float(noise.std()) < 0.3
    assert float((noise[..., 1:] - noise[..., :-1]).abs().mean()) < 0.25 * float(noise.std())  # white noise: ~1.1 x
    torch.manual_seed(7)
    loss = method.training_step({"image": image}, "train")["loss"]
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(method.reconstruct(image + noise), image)
        clean = torch.nn.functional.mse_loss(method.reconstruct(image), image)
    torch.testing.assert_close(loss.detach(), expected)
    assert not torch.isclose(loss.detach(), clean)
    # Eval mode (validation): the same noise every call, torch's RNG untouched.
    method.eval()
    state = torch.get_rng_state()
    first = method.training_step({"image": image}, "train")["loss"]
    second = method.training_step({"image": image}, "train")["loss"]
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dims", [3, 2])
def test_median_filtered_map_drops_a_speck_and_keeps_a_region(dims):
    size = 16
    train = normal_images(12, size, dims)
    test = normal_images(2, size, dims, seed=3)
    speck = (0, 0) + (size // 2,) * dims  # one voxel of case 0
    test[speck] = 1.0
    region = (slice(1, 2), slice(None)) + (slice(2, 7),) * dims  # a 5-voxel-sided box in case 1
    test[region] = 1.0
    maps = {}
    for median in (0, 3):
        floor = methods.get("voxel_zscore").build("paper", spatial_dims=dims, image_size=size, map_median=median)
        floor.fit_reference([{"image": train}])
        maps[median] = floor.score({"image": test})
    raw, smooth = maps[0].map, maps[3].map
    inside = (1, 0) + (4,) * dims
    assert float(raw[speck]) > 5 * float(raw[0].median())  # the raw z-map flags the speck ...
    assert float(smooth[speck]) < 2 * float(smooth[0].median())  # ... the median filter removes it
    assert float(smooth[inside]) > 0.8 * float(raw[inside])  # and keeps the box
    assert float(maps[3].sample[1]) > float(maps[3].sample[0])


def test_autoencoder_map_median_filters_the_same_map():
    method, _ = trained(3, "residual")
    test = normal_images(2, method.config.image_size, 3, seed=4)
    raw = method.score({"image": test}).map
    method.config.map_median = 3
    smooth = method.score({"image": test})
    torch.testing.assert_close(smooth.map, median_filter(raw, 3, spatial_dims=3))
    assert not torch.equal(smooth.map, raw)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("map_median", 4, "map_median must be 0 .* odd"),
    ("noise_std", -0.1, "noise_std must be >= 0"),
    ("noise_downsample", 0, "noise_downsample must be in"),
])
def test_denoising_options_are_validated(key, value, message):
    with pytest.raises(ValueError, match=message):
        methods.get("autoencoder").build("tiny", **{key: value})
