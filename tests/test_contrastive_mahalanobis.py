"""contrastive_mahalanobis (Rafiee thesis ch. 5): loss, key-encoder EMA, queue, Mahalanobis score, views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medood import methods
from medood.methods.components.feature_reference import fit_gaussian, mahalanobis
from medood.methods.components.views import color_jitter, random_resized_crop
from medood.methods.contrastive_mahalanobis import nt_xent, queue_nt_xent


def build(**overrides):
    torch.manual_seed(0)
    return methods.get("contrastive_mahalanobis").build("tiny", **overrides)


def images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.2
    x[:, :, size // 4 : size // 2, size // 8 : 3 * size // 4] += 0.7
    return x


# -- loss ------------------------------------------------------------------------------------------


def test_batch_loss_equals_monai_contrastive_loss():
    from monai.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(6, 16, generator=g), dim=1), F.normalize(torch.randn(6, 16, generator=g), dim=1)
    expected = ContrastiveLoss(temperature=0.07)(a, b)
    torch.testing.assert_close(nt_xent(a, b, 0.07), expected, atol=1e-5, rtol=1e-5)


def test_queue_loss_on_a_hand_built_case():
    e1 = torch.zeros(1, 8)
    e1[0, 0] = 1
    queue = torch.zeros(5, 8)
    queue[:, 1] = 1  # orthogonal to e1
    for tau in (0.5, 0.07):  # at 0.07 the loss is ~3e-6: compare to fp32 resolution
        expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 5))
        assert float(queue_nt_xent(e1, e1, queue, tau)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_loss_is_finite_under_bf16_autocast():
    method = build(negatives="queue", queue_size=32)
    method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.training_step({"image": images(4)}, "contrastive")["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -- key encoder EMA and queue ---------------------------------------------------------------------


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_key_encoder_ema_at_the_start_of_a_training_step():
    method = build(negatives="queue", queue_size=32, key_momentum=0.9)
    with torch.no_grad():  # make f_k differ from f_q so the average is visible
        for p in method.encoder_k.parameters():
            p.add_(0.5)
    k0, q = _params(method.encoder_k), _params(method.encoder_q)
    method.train()
    method.training_step({"image": images(4)}, "contrastive")
    for before, query, after in zip(k0, q, method.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * query)


def test_no_ema_or_enqueue_under_no_grad_or_eval():
    method = build(negatives="queue", queue_size=32)
    k0, queue0, ptr0 = _params(method.encoder_k), method.queue.clone(), int(method.queue_ptr)
    method.train()
    with torch.no_grad():
        method.training_step({"image": images(4)}, "contrastive")
    method.eval()
    method.training_step({"image": images(4)}, "contrastive")
    assert all(torch.equal(a, b) for a, b in zip(k0, method.encoder_k.parameters(), strict=True))
    assert torch.equal(method.queue, queue0) and int(method.queue_ptr) == ptr0


def test_momentum_zero_copies_the_query_encoder():
    method = build(negatives="queue", queue_size=32, key_momentum=0.0)
    with torch.no_grad():
        for p in method.encoder_k.parameters():
            p.add_(1.0)
    method.train()
    method.training_step({"image": images(4)}, "contrastive")
    for a, b in zip(method.encoder_q.parameters(), method.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_queue_is_fifo_with_wrap_around_and_unit_norm():
    method = build(negatives="queue", queue_size=10)
    method.train()
    keys1 = F.normalize(torch.randn(6, method.config.proj_dim), dim=1)
    keys2 = F.normalize(torch.randn(6, method.config.proj_dim), dim=1)
    method._enqueue(keys1)
    assert int(method.queue_ptr) == 6
    torch.testing.assert_close(method.queue[:6], keys1)
    method._enqueue(keys2)
    assert int(method.queue_ptr) == 2  # (6 + 6) % 10
    torch.testing.assert_close(method.queue[6:], keys2[:4])
    torch.testing.assert_close(method.queue[:2], keys2[4:])
    method.training_step({"image": images(4)}, "contrastive")
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(10))


# -- Mahalanobis score -----------------------------------------------------------------------------


def test_mahalanobis_equals_scikit_learn():
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    test = rng.normal(size=(20, 6)) * 2
    for kind, estimator in (("empirical", EmpiricalCovariance()), ("ledoit_wolf", LedoitWolf())):
        mean, precision = fit_gaussian(torch.from_numpy(train), kind)
        ours = mahalanobis(torch.from_numpy(test), mean, precision).numpy()
        np.testing.assert_allclose(ours, estimator.fit(train).mahalanobis(test), rtol=1e-4)
    # Fewer samples than dimensions: empirical falls back to Ledoit-Wolf.
    few = train[:4]
    mean, precision = fit_gaussian(torch.from_numpy(few), "empirical")
    np.testing.assert_allclose(
        mahalanobis(torch.from_numpy(test), mean, precision).numpy(), LedoitWolf().fit(few).mahalanobis(test), rtol=1e-4
    )


def test_mahalanobis_is_affine_invariant_and_zero_at_the_mean():
    rng = np.random.default_rng(1)
    train, test = torch.from_numpy(rng.normal(size=(100, 5))), torch.from_numpy(rng.normal(size=(10, 5)))
    a, shift = torch.from_numpy(rng.normal(size=(5, 5))), torch.from_numpy(rng.normal(size=5))
    mean, precision = fit_gaussian(train)
    mean2, precision2 = fit_gaussian(train @ a + shift)
    torch.testing.assert_close(mahalanobis(test, mean, precision), mahalanobis(test @ a + shift, mean2, precision2))
    assert float(mahalanobis(mean[None], mean, precision)) == pytest.approx(0.0, abs=1e-12)


def test_reference_scores_match_sklearn_through_the_method():
    from sklearn.covariance import LedoitWolf

    method = build()
    method.eval()
    x = images(12)
    batch = {"image": x, "id": [f"c{i}" for i in range(12)]}
    method.fit_reference([batch])
    feats = method.features(x).detach().double().numpy()
    expected = LedoitWolf().fit(feats).mahalanobis(feats)
    np.testing.assert_allclose(method.score(batch).sample.double().numpy(), expected, rtol=1e-3)


# -- features, init weights, determinism -----------------------------------------------------------


def test_features_are_unit_norm_and_scores_deterministic():
    method = build()
    method.eval()
    batch = {"image": images(6), "id": [f"c{i}" for i in range(6)]}
    h = method.features(batch["image"])
    torch.testing.assert_close(h.norm(dim=1), torch.ones(6))
    method.fit_reference([batch])
    torch.testing.assert_close(method.score(batch).sample, method.score(batch).sample, rtol=0, atol=0)


def test_paper_encoder_is_torchvision_resnet50_without_fc():
    from medood.methods.contrastive_mahalanobis import build_encoder

    config = methods.get("contrastive_mahalanobis").make_config("paper")
    encoder = build_encoder(config)
    assert len(encoder.state_dict()) == 318
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(23.51e6, rel=1e-3)
    with torch.no_grad():
        assert encoder.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)


def test_init_weights_load_from_a_moco_named_state_dict():
    method = build()
    source = build()
    with torch.no_grad():
        for p in source.encoder_q.parameters():
            p.add_(0.25)
    state = {f"module.encoder_q.{k}": v for k, v in source.encoder_q.state_dict().items()}
    state["module.encoder_q.fc.weight"] = torch.zeros(3, 3)  # a classifier head is skipped
    method.load_init_weights(state)
    for a, b, c in zip(method.encoder_q.state_dict().values(), method.encoder_k.state_dict().values(),
                       source.encoder_q.state_dict().values(), strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_init_weights_named_in_the_config_load_from_a_local_file(tmp_path):
    source = build()
    with torch.no_grad():
        for p in source.encoder_q.parameters():
            p.add_(0.5)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "state_dict": {f"module.encoder_q.{k}": v for k, v in source.encoder_q.state_dict().items()}},
               path)
    method = build(init_weights=str(path))
    for a, c in zip(method.encoder_q.state_dict().values(), source.encoder_q.state_dict().values(), strict=True):
        assert torch.equal(a, c)
    payload = method.to_checkpoint()
    assert payload["config"]["init_weights"] == ""  # the weights travel in the state dict
    path.unlink()
    restored = methods.AnomalyMethod.from_checkpoint(payload)  # no weight file needed any more
    assert torch.equal(restored.encoder_q.conv1.weight, source.encoder_q.conv1.weight)
    with pytest.raises(ValueError, match=r"init_weights='.*moco_v2.pth.tar': no such file"):
        build(init_weights=str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        build(init_weights=str(path))


# -- views -----------------------------------------------------------------------------------------


def _orientation(image: torch.Tensor) -> float:
    """Angle (degrees) of the principal axis of an image's intensity."""
    h, w = image.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    m = image.double().squeeze()
    total = m.sum()
    cx, cy = (m * x).sum() / total, (m * y).sum() / total
    mu20, mu02 = (m * (x - cx) ** 2).sum() / total, (m * (y - cy) ** 2).sum() / total
    mu11 = (m * (x - cx) * (y - cy)).sum() / total
    return math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))


def test_views_shapes_ranges_rotation_bound_and_no_flip():
    bar = torch.zeros(64, 1, 65, 65)
    bar[:, :, 30:35, 8:57] = 1.0  # a horizontal bar through the centre
    torch.manual_seed(0)
    views = random_resized_crop(bar, 33, scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation_degrees=20)
    assert views.shape == (64, 1, 33, 33) and views.min() >= 0 and views.max() <= 1
    angles = [abs(_orientation(v)) for v in views]
    assert max(angles) <= 21 and max(angles) > 10
    # No rotation, no flip, full crop: the image itself; hflip_prob = 1 mirrors it; hflip_prob = 0 never does.
    ramp = torch.linspace(0, 1, 32).expand(4, 1, 32, 32).contiguous()
    torch.testing.assert_close(random_resized_crop(ramp, 32, (1.0, 1.0), (1.0, 1.0)), ramp, atol=1e-5, rtol=0)
    torch.testing.assert_close(random_resized_crop(ramp, 32, (1.0, 1.0), (1.0, 1.0), hflip_prob=1.0), ramp.flip(-1),
                               atol=1e-5, rtol=0)
    jittered = color_jitter(torch.rand(8, 1, 16, 16), 0.4, 0.4)
    assert jittered.min() >= 0 and jittered.max() <= 1


class _Shard:
    """Numpy batches with ids, as ``read_split`` yields them."""

    def __init__(self, image: torch.Tensor, labels: list[int], prefix: str) -> None:
        self.image, self.labels, self.prefix = image.numpy(), np.asarray(labels, dtype=np.int64), prefix

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for start in range(0, len(self.labels), batch_size):
            stop = min(start + batch_size, len(self.labels))
            ids = np.array([f"{self.prefix}{i}" for i in range(start, stop)], dtype=object)
            yield {"image": self.image[start:stop], "label": self.labels[start:stop], "id": ids}


def test_validation_reports_the_label_free_sensitivity_score():
    from medood.platform.train import fit_reference, validate

    method = build()
    train = _Shard(images(60, seed=1), [0] * 60, "train")
    val = _Shard(torch.cat([images(10, seed=2), images(4, seed=3).flip(-2)]), [0] * 10 + [1] * 4, "val")
    fit_reference(method, train, torch.device("cpu"), 32)
    held_out = method.sensitivity_reference()
    assert held_out is not None and 0 < len(held_out) < 60
    metrics, _ = validate(method, train, val, torch.device("cpu"), False, 32, 64, stage="contrastive")
    assert 0.0 <= metrics["val_sensitivity"] <= 1.0
    method.eval()
    normal_val = torch.from_numpy(val.image[:10])
    expected = roc_auc_score(np.r_[np.zeros(len(held_out)), np.ones(10)],
                             np.r_[held_out.numpy(), method.sensitivity_scores({"image": normal_val}).numpy()])
    assert metrics["val_sensitivity"] == pytest.approx(expected, abs=1e-6)
