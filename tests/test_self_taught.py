"""self_taught (spec 004 §8): InfoNCE, the multi-sphere loss, centres, pruning, scores, labels, views."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from medood import methods
from medood.methods.base import AnomalyMethod
from medood.methods.self_taught import (
    ad_view,
    id_fraction,
    kmeans_centers,
    knn_score,
    mad_loss,
    nearest_center,
    pretext_view,
    prune_spheres,
    semi_labels,
    snap_centers,
)

SMALL = {"image_size": 32, "widths": (8, 8, 16, 16), "head": (16, 8), "n_spheres": 3}


def build(**overrides) -> AnomalyMethod:
    torch.manual_seed(0)
    return methods.get("self_taught").build("tiny", **{**SMALL, **overrides})


def _infonce_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1 written out: mean over the 2N anchors of -log softmax of the positive, self excluded."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(sim[i, k]) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim[i, j]) / denominator)
    return torch.tensor(total / (2 * n))


def test_infonce_matches_eq1_known_value_scale_invariance_and_symmetry():
    method = build()
    eye = torch.eye(4)
    assert float(method.contrastive(eye, eye)) == pytest.approx(-math.log(math.e**2 / (math.e**2 + 6)), abs=1e-4)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = method.contrastive(z1, z2)
    torch.testing.assert_close(loss, _infonce_reference(z1, z2, 0.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(method.contrastive(3 * z1, 0.5 * z2), loss)
    torch.testing.assert_close(method.contrastive(z2, z1), loss)


def test_mad_loss_values_nearest_active_centre_and_no_gradient_to_centres():
    eta, eps = 2.0, 1e-6
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.5, 0.0]])
    active = torch.tensor([True, True, False])  # the closer centre 2 is inactive
    embedding = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.6, 0.0], [10.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0, -1])
    sq, nearest = nearest_center(embedding, centers, active)
    assert nearest.tolist() == [0, 0, 0, 1]
    per_sample = [0.0, eta * eps, 0.36, eta / (9.0 + eps)]
    loss = mad_loss(sq, y, eta, eps)
    assert float(loss.detach()) == pytest.approx(sum(per_sample) / 4, rel=1e-5)  # the batch mean
    loss.backward()
    assert embedding.grad is not None and not centers.requires_grad
    # A known anomaly is pushed away: its gradient points towards its centre (descent moves it out).
    assert embedding.grad[3, 1] < 0

    method = build()
    method.train()
    method.training_step({"image": torch.rand(4, 1, 32, 32)}, "ad")  # fallback centre init
    assert method.centers.grad is None and "centers" in dict(method.named_buffers())


def test_centre_init_uses_only_non_abnormal_rows_snaps_and_one_sphere_is_the_mean():
    assert snap_centers(torch.tensor([0.05, -0.02, 0.3, 0.0]), 0.1).tolist() == pytest.approx([0.1, -0.1, 0.3, 0.0])
    x = torch.randn(20, 3).numpy()
    assert kmeans_centers(x, 1, 0) == pytest.approx(x.mean(0, keepdims=True))
    torch.testing.assert_close(torch.from_numpy(kmeans_centers(x, 4, 0)), torch.from_numpy(kmeans_centers(x, 4, 0)))

    method = build(n_spheres=1, center_eps=0.0)
    method.eval()
    image = torch.rand(6, 1, 32, 32)
    image[0] += 5.0  # a known anomaly far away must not move the mean
    batch = {"image": image, "label": torch.tensor([1, 0, 0, -1, 0, 0]), "id": [f"c{i}" for i in range(6)]}
    with torch.no_grad():
        stats = method.stage_statistics("ad", [batch])
        assert stats["features"].shape[0] == 5
        method.begin_stage("ad", stats)
        expected = method.ad_head(method.encoder(image[1:])).mean(0)
    torch.testing.assert_close(method.centers[0], expected, rtol=1e-5, atol=1e-5)
    assert method.active.tolist() == [True] and bool(method.centers_ready)


def test_pruning_rule_never_empties_counts_only_normals_and_not_in_eval():
    active = torch.ones(3, dtype=torch.bool)
    assert prune_spheres(torch.tensor([100, 4, 6]), active, 0.05).tolist() == [True, False, True]
    assert prune_spheres(torch.tensor([0, 0, 0]), active, 0.05).tolist() == [True, True, True]
    assert prune_spheres(torch.tensor([5, 5, 5]), active, 1.0).any()
    assert prune_spheres(torch.tensor([100, 4, 6]), torch.tensor([False, True, True]), 0.8).tolist() == [False, False, True]  # inactive count ignored

    method = build()
    batch = {"image": torch.rand(6, 1, 32, 32), "label": torch.tensor([1, 1, 0, 0, 0, -1]), "id": list("abcdef")}
    method.train()
    method.training_step(batch, "ad")
    assert int(method._counts.sum()) == 4  # the two known anomalies are not counted
    method.eval()
    with torch.no_grad():
        method.training_step(batch, "ad")
    assert int(method._counts.sum()) == 4  # nothing counted in eval mode
    method._counts = torch.tensor([50, 1, 0])
    method.end_epoch("ad", 0, method.epoch_statistics("ad"))
    assert method.active.tolist() == [True, False, False] and int(method._counts.sum()) == 0


def test_score_is_the_unsquared_nearest_distance_deterministic_and_batch_independent():
    method = build()
    method.train()
    for _ in range(2):
        method.training_step({"image": torch.rand(8, 1, 32, 32)}, "ad")
    method.eval()
    image = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        embedding = method.ad_head(method.encoder(image))
    method.centers[0] = embedding[0]
    method.active[0] = True
    scores = method.score({"image": image}).sample
    expected = torch.cdist(embedding, method.centers[method.active]).min(1).values
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-3) and bool((scores >= 0).all())
    torch.testing.assert_close(method.score({"image": image}).sample, scores, rtol=0, atol=0)
    torch.testing.assert_close(method.score({"image": image[2:4]}).sample, scores[2:4], rtol=1e-5, atol=1e-5)


def test_knn_score_clamps_k_and_the_bank_excludes_known_anomalies():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert knn_score(torch.tensor([[0.0, 0.0]]), bank, 2).tolist() == pytest.approx([0.5])
    assert knn_score(torch.tensor([[0.0, 0.0]]), bank, 100).tolist() == pytest.approx([4.0 / 3])
    method = build(score="knn", ad_epochs=0)
    assert [s.name for s in method.stages()] == ["pretext"]
    method.eval()
    method.fit_reference([{"image": torch.rand(5, 1, 32, 32), "label": torch.tensor([0, 1, 0, 0, 1])}])
    assert method.bank.shape == (3, 16)
    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    image = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(restored.score({"image": image}).sample, method.score({"image": image}).sample)
    with pytest.raises(ValueError, match="ad_epochs=0.*knn"):
        methods.get("self_taught").make_config("tiny", {"ad_epochs": 0})


def test_label_mapping():
    fraction = sum(id_fraction(f"case{i}") < 0.05 for i in range(10000)) / 10000
    assert 0.04 < fraction < 0.06 and id_fraction("x") == id_fraction("x")
    method = build(known_normal_fraction=0.5)
    ids = [f"case{i}" for i in range(40)]
    label = torch.tensor([1, -1] * 10 + [0] * 20)
    y = semi_labels({"image": torch.zeros(40, 1, 2, 2), "label": label, "id": ids}, method.config)
    assert (y[label == 1] == -1).all() and (y[label == -1] == 0).all()
    assert set(y[label == 0].tolist()) == {0, 1}
    assert y[label == 0].tolist() == [int(id_fraction(i) < 0.5) for i in ids[20:]]


def test_transfer_keeps_the_encoder_and_the_ad_head_is_not_the_pretext_head():
    method = build()
    encoder_before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    stats = {"features": torch.randn(10, 16)}
    method.begin_stage("ad", stats)
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k])
    assert not torch.equal(method.ad_head[0].weight, method.pretext_head[0].weight)
    transferred = build(transfer_head=True)
    transferred.begin_stage("ad", stats)
    assert torch.equal(transferred.ad_head[0].weight, transferred.pretext_head[0].weight)


def test_encoder_is_bias_free_without_affine_batchnorm_and_shapes():
    method = build()
    convs = [m for m in method.encoder.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in method.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and all(m.bias is None for m in convs)
    assert norms and all(not m.affine for m in norms)
    method.eval()
    features = method.encoder(torch.rand(2, 1, 32, 32))
    assert features.shape == (2, 16) and method.ad_head(features).shape == (2, 8)
    paper = methods.get("self_taught").build("paper")
    assert paper.ad_head(torch.zeros(1, 512)).shape == (1, 128)


def test_views_differ_keep_shape_and_range_reproduce_under_seed_and_honour_no_flip():
    config = build().config
    image = torch.zeros(2, 1, 32, 32)
    image[:, :, 4:12, 4:28] = 1.0
    v1, v2 = pretext_view(image, config), pretext_view(image, config)
    assert v1.shape == image.shape and not torch.equal(v1, v2)
    assert float(v1.min()) >= 0 and float(v1.max()) <= 1
    torch.manual_seed(3)
    a = pretext_view(image, config)
    torch.manual_seed(3)
    torch.testing.assert_close(pretext_view(image, config), a, rtol=0, atol=0)
    # No flip and no rotation: the bright bar stays in the top half of the image.
    still = build(max_rotation_ad=0.0, scale=(1.0, 1.0), brightness=(1.0, 1.0)).config
    out = ad_view(image, still)
    assert float(out[:, :, :16].sum()) > 10 * float(out[:, :, 16:].sum())
    flipping = build(max_rotation_ad=0.0, scale=(1.0, 1.0), brightness=(1.0, 1.0), ad_vflip=True).config
    torch.manual_seed(0)
    flipped = torch.stack([ad_view(image[:1], flipping)[0, 0, 16:].sum() for _ in range(20)])
    assert bool((flipped > 10).any())


def test_stages_and_checkpoint_round_trip_with_centres():
    method = build()
    assert [(s.name, s.epochs) for s in method.stages()] == [("pretext", 6), ("ad", 8)]
    assert [s.name for s in build(pretext="none").stages()] == ["ad"]
    method.begin_stage("ad", {"features": torch.randn(12, 16)})
    method.active[1] = False
    method.eval()
    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.active, method.active) and torch.equal(restored.centers, method.centers)
    image = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(restored.score({"image": image}).sample, method.score({"image": image}).sample)
