"""joint_embedding (seed 000): the spec's unit tests (shared/specs/000_joint_embedding.md Sec. 8), no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medood.methods import get
from medood.methods.components.hard_augmentations import HARD_AUGMENTATIONS, MIN_ANOMALY_VOXELS
from medood.methods.joint_embedding import (
    CUBE_ROTATIONS,
    apply_rotation,
    fpfn_weight,
    invert_rotation,
    reduce_slices,
    scattered_mask,
    sim_weight,
    similarity_loss,
    slice_labels,
    weighted_slice_bce,
)

JE = get("joint_embedding")


def tiny(**overrides):
    torch.manual_seed(0)
    return JE.build("tiny", **overrides)


# -- latent shape reduction (Sec. 3.1, Fig. 5; Table 2) -------------------------------------------------


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_reduction_equals_block_loop(reduction):
    torch.manual_seed(0)
    b, s, c2, h, w, c3, d3 = 2, 8, 6, 2, 3, 3, 2
    features = torch.randn(b, s, c2, h, w)
    z = reduce_slices(features, c3, d3, reduction)
    assert z.shape == (b, c3, d3, h, w)
    expected = torch.empty_like(z)
    for n in range(b):
        for c in range(c3):
            for d in range(d3):
                block = features[n, d * (s // d3):(d + 1) * (s // d3), c * (c2 // c3):(c + 1) * (c2 // c3)]
                expected[n, c, d] = block.amax(dim=(0, 1)) if reduction == "max" else block.mean(dim=(0, 1))
    torch.testing.assert_close(z, expected)


def test_a_spike_lands_in_its_block():
    features = torch.zeros(1, 8, 6, 2, 2)
    features[0, 5, 4, 1, 0] = 1.0  # slice 5, channel 4
    z = reduce_slices(features, channels=3, depth=2)
    assert z[0, 4 // 2, 5 // 4, 1, 0] == 1.0 and z.sum() == 1.0


def test_reduction_refuses_non_multiples():
    with pytest.raises(ValueError, match="not multiples"):
        reduce_slices(torch.zeros(1, 7, 6, 2, 2), channels=3, depth=2)
    with pytest.raises(ValueError, match="not multiples"):
        reduce_slices(torch.zeros(1, 8, 5, 2, 2), channels=3, depth=2)


# -- slice labels and the weighted BCE (Sec. 3.3.1, Fig. 8) --------------------------------------------


def test_label_smoothing_bands():
    pixels = 10_000
    fractions = torch.tensor([0.02, 0.03, 0.045, 0.06, 0.07])
    labels = slice_labels(fractions * pixels, pixels)
    torch.testing.assert_close(labels, torch.tensor([0.0, 0.0, 0.75, 0.75, 1.0]))
    torch.testing.assert_close(slice_labels(torch.tensor([0.0, 1.0, 300.0]), pixels, smoothing=False),
                               torch.tensor([0.0, 1.0, 1.0]))
    counts = slice_labels(torch.tensor([6.0, 7.0, 12.0, 13.0]), pixels, mode="count")
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.75, 0.75, 1.0]))


def test_weighted_bce():
    torch.manual_seed(0)
    logits = torch.randn(10)
    targets = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0, 0.75, 1.0])
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(7 / 3))(logits, targets)
    torch.testing.assert_close(weighted_slice_bce(logits, targets), expected)
    torch.testing.assert_close(weighted_slice_bce(logits, targets, weighted=False),
                               F.binary_cross_entropy_with_logits(logits, targets))
    no_positive = weighted_slice_bce(logits, torch.zeros(10))
    assert torch.isfinite(no_positive)
    torch.testing.assert_close(no_positive, F.binary_cross_entropy_with_logits(logits, torch.zeros(10)))


# -- similarity loss (Sec. 3.1, Fig. 4) -----------------------------------------------------------------


def test_similarity_loss_known_value_and_invariances():
    eye = torch.eye(4)
    assert math.isclose(float(similarity_loss(eye, eye)), -math.log(math.e**2 / (math.e**2 + 6)), rel_tol=1e-5)
    torch.manual_seed(0)
    u, v = torch.randn(4, 3, 2, 2, 2), torch.randn(4, 3, 2, 2, 2)
    base = similarity_loss(u, v)
    torch.testing.assert_close(similarity_loss(3.0 * u, 0.5 * v), base)
    aligned = similarity_loss(v + 0.01 * u, v)
    swapped = similarity_loss(torch.cat([(v + 0.01 * u)[2:], (v + 0.01 * u)[:2]]), v)  # normals <-> twins
    assert swapped > aligned
    assert float(similarity_loss(v, v, kind="cosine")) < float(similarity_loss(u, v, kind="cosine"))


# -- pretask, rotations, schedules ----------------------------------------------------------------------


def test_scattered_mask_ratio_and_determinism():
    g = torch.Generator().manual_seed(3)
    mask = scattered_mask((4, 1, 16, 16, 16), 0.3, g)
    n = mask.numel()
    assert abs(float(mask.mean()) - 0.3) <= 3 * math.sqrt(0.3 * 0.7 / n)
    torch.testing.assert_close(mask, scattered_mask((4, 1, 16, 16, 16), 0.3, torch.Generator().manual_seed(3)))


def test_24_invertible_cube_rotations_that_pick_every_axis():
    probe = np.arange(5**3).reshape(5, 5, 5)
    images = {apply_rotation(probe, ops).tobytes() for ops in CUBE_ROTATIONS}
    assert len(CUBE_ROTATIONS) == 24 and len(images) == 24
    slice_axes = []
    for ops in CUBE_ROTATIONS:
        moved = apply_rotation(probe, ops)
        np.testing.assert_array_equal(apply_rotation(moved, invert_rotation(ops)), probe)
        # The first slice of the rotated volume is a face of the original: one coordinate is constant.
        coords = np.stack(np.unravel_index(moved[0].ravel(), probe.shape))
        slice_axes.append(next(a for a in range(3) if len(set(coords[a].tolist())) == 1))
    assert np.bincount(slice_axes, minlength=3).tolist() == [8, 8, 8]


def test_schedules():
    assert fpfn_weight(0.0) == 100.0 and fpfn_weight(0.3) == 0.05 and fpfn_weight(1.0) == 0.05
    assert math.isclose(fpfn_weight(0.15), 50.0)
    assert sim_weight(0.0, 0.0125, 0.0025) == 0.0125 and math.isclose(sim_weight(1.0, 0.0125, 0.0025), 0.0025)
    assert sim_weight(2.0, 0.0125, -0.1) == 0.0  # clamped


# -- pseudo-anomalies (Sec. 4, [code]) -----------------------------------------------------------------


def test_pairs_copy_paste_only_masks_are_changed_voxels_and_share_rotation():
    model = tiny(elastic_prob=0.0, jitter_prob=0.0)
    torch.manual_seed(0)
    image = torch.zeros(4, 1, 64, 64, 64)
    image[:, :, 12:52, 8:56, 16:48] = torch.rand(4, 1, 40, 48, 32)
    normal, twin, mask = model.make_pairs(image, np.random.default_rng(0))
    assert normal.shape == twin.shape == mask.shape == image.shape
    for n, t, m in zip(normal, twin, mask, strict=True):
        changed = (t - n).abs() > 1e-6
        assert torch.equal(changed, m.bool()) and int(m.sum()) >= MIN_ANOMALY_VOXELS
        # The rotation moved the image, twin and mask alike: the twin equals the normal outside the mask.
        assert torch.equal(t[~m.bool()], n[~m.bool()])
    assert "copy_paste" in HARD_AUGMENTATIONS and set(model.config.train_anomalies) == {"copy_paste", "copy_paste_rot"}
    with pytest.raises(ValueError, match="train_anomalies"):
        JE.build("tiny", train_anomalies=("sobel_filter",))


# -- networks, stages, losses, score --------------------------------------------------------------------


def test_networks_shapes_and_config_checks():
    model = tiny()
    x = torch.rand(2, 1, 32, 32, 32)
    seg, cls, z3 = model.net3d(x)
    assert seg.shape == (2, 1, 32, 32, 32) and cls.shape == (2,) and z3.shape == (2, 64, 2, 2, 2)
    features, logits = model.net2d(torch.rand(6, 1, 64, 64))
    assert features.shape == (6, 128, 2, 2) and logits.shape == (6,)
    with pytest.raises(ValueError, match="bottleneck"):
        JE.build("tiny", slice_scale=4)
    with pytest.raises(ValueError, match="multiple of the bottleneck depth"):
        JE.build("tiny", n_slices=15)
    with pytest.raises(ValueError, match="pretext"):
        JE.build("tiny", pretext="index")


def test_stages_optimizers_and_losses_reach_only_their_network():
    assert [s.name for s in tiny(pretext="none").stages()] == ["joint"]
    solo = tiny(joint_embedding=False)
    assert solo.net2d is None and set(solo.configure_optimizers("joint")) == {"main"}
    model = tiny(elastic_prob=0.0)
    assert [s.name for s in model.stages()] == ["pretext", "joint"]
    optimizers = model.configure_optimizers("joint")
    assert set(optimizers) == {"main", "2d"}
    model.configure_schedulers("joint", optimizers)
    torch.manual_seed(1)
    losses = model.training_step({"image": torch.rand(2, 1, 64, 64, 64)}, "joint")
    assert {"loss", "loss_2d", "sim", "seg", "cls", "cls_2d"} <= set(losses)
    params3d, params2d = list(model.net3d.parameters()), list(model.net2d.parameters())
    # Each loss back-propagated into its own network's parameters (the platform's per-optimizer backward)
    # leaves the other network's gradients untouched.
    losses["loss_2d"].backward(inputs=params2d, retain_graph=True)
    assert all(p.grad is None for p in params3d)
    grads2d = [None if p.grad is None else p.grad.clone() for p in params2d]
    losses["loss"].backward(inputs=params3d)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads2d, params2d, strict=True))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params3d)


@pytest.mark.parametrize("pretext", ["scatter", "box", "rotation", "jigsaw"])
def test_pretexts_give_a_finite_loss(pretext):
    model = tiny(pretext=pretext)
    torch.manual_seed(0)
    losses = model.training_step({"image": torch.rand(2, 1, 64, 64, 64)}, "pretext")
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad


def test_score_is_deterministic_in_eval_needs_no_2d_network_and_maps_to_the_input_grid():
    model = tiny().eval()
    image = torch.rand(2, 1, 64, 64, 64)
    first = model.score({"image": image})
    model.net2d = None
    second = model.score({"image": image})
    torch.testing.assert_close(first.sample, second.sample)
    assert first.sample.shape == (2,) and bool(((first.sample >= 0) & (first.sample <= 1)).all())
    assert first.map.shape == image.shape and float(first.map.min()) >= 0 and float(first.map.max()) <= 1
    model.config.sample_score = "cls"  # the paper's score: the class probability, not a function of the map
    by_class = model.score({"image": image})
    assert not torch.allclose(by_class.sample, by_class.map.flatten(1).amax(1))
    model.config.sample_score = "seg_max"
    torch.testing.assert_close(model.score({"image": image}).sample, first.map.flatten(1).amax(1), rtol=1e-3, atol=1e-3)
    model.config.sample_score = "seg_mean"
    torch.testing.assert_close(model.score({"image": image}).sample, first.map.flatten(1).mean(1), rtol=1e-3, atol=1e-3)


def test_pretrained_2d_weights_load_from_a_named_file(tmp_path):
    from monai.networks.nets import ResNet

    source = ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=3,
                    conv1_t_stride=2, num_classes=1000)
    path = tmp_path / "gray.pt"
    torch.save(source.state_dict(), path)
    model = tiny(pretrained_2d="imagenet_gray", pretrained_2d_path=str(path))
    torch.testing.assert_close(model.net2d.net.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.net2d.net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.warns(UserWarning, match="starts from scratch"):
        JE.build("tiny", pretrained_2d="imagenet_gray")
    payload = model.to_checkpoint()
    assert payload["config"]["pretrained_2d_path"] == ""  # the weights travel in the state dict


# -- slice_chunk: the 2D network over checkpointed chunks (spec ambiguity 11) -----------------------------


def _chunked_step(image, checkpointed: bool):
    """One joint step of a tiny model whose 64 slices (2 x 2 volumes x 16) run in 4 chunks of 16, with the
    checkpoint used (and counted) or replaced by a plain call; returns the model, losses, gradients, calls."""
    import medood.methods.joint_embedding as je

    model = tiny(slice_chunk=16, elastic_prob=0.0)
    calls = {"checkpoint": 0, "forward": 0}
    model.net2d.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    real = je.checkpoint

    def spy(fn, *args, **kwargs):
        calls["checkpoint"] += 1
        return real(fn, *args, **kwargs) if checkpointed else fn(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(je, "checkpoint", spy)
        torch.manual_seed(1)
        losses = model.training_step({"image": image}, "joint")
        params3d, params2d = list(model.net3d.parameters()), list(model.net2d.parameters())
        # The platform's per-optimizer backward (medood.platform.train.step_optimizers).
        losses["loss"].backward(inputs=params3d, retain_graph=True)
        losses["loss_2d"].backward(inputs=params2d)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, losses, grads, calls


def test_slice_chunk_checkpoint_matches_the_uncheckpointed_chunks_and_updates_batchnorm_once():
    image = torch.rand(2, 1, 64, 64, 64)
    model, losses, grads, calls = _chunked_step(image, checkpointed=True)
    reference, ref_losses, ref_grads, ref_calls = _chunked_step(image, checkpointed=False)
    # 4 chunks; with the checkpoint each chunk's forward runs again in backward.
    assert calls == {"checkpoint": 4, "forward": 8} and ref_calls == {"checkpoint": 4, "forward": 4}
    for key in ("loss", "loss_2d", "sim", "cls_2d"):
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) and any(name.startswith("net2d.") for name in grads)
    assert any(name.startswith("net3d.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    buffers, ref_buffers = dict(model.net2d.named_buffers()), dict(reference.net2d.named_buffers())
    fresh = dict(tiny(slice_chunk=16).net2d.named_buffers())
    for name, value in buffers.items():
        torch.testing.assert_close(value, ref_buffers[name], rtol=1e-6, atol=1e-7, msg=name)
        if name.endswith("num_batches_tracked"):
            assert int(value) == 4  # once per chunk, not again in the recompute
        elif name.endswith("running_mean"):
            assert not torch.equal(value, fresh[name])  # the statistics did move
    assert all(m.momentum == 0.1 for m in model.net2d.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_slice_chunk_keeps_the_slice_order_and_is_validated():
    model = tiny(slice_chunk=16).eval()
    slices = torch.rand(4, 16, 64, 64)  # 2B = 4 volumes: normals then twins
    with torch.no_grad():
        chunked = model._run_2d(slices)
        model.config.slice_chunk = 0
        whole = model._run_2d(slices)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slice_chunk must be >= 0"):
        JE.build("tiny", slice_chunk=-1)
