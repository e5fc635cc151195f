"""Unit tests of the MAE + anomaly classifier method (seed 001), its MAE and its pseudo-abnormal boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medood.methods import get
from medood.methods.base import AnomalyMethod
from medood.methods.components.mae import MaskedAutoencoder
from medood.methods.components.pseudo_abnormal import PseudoAbnormalBoxes, pseudo_abnormal_boxes
from medood.methods.mae_classifier import MAEClassifier


def tiny_mae(spatial_dims: int = 2, image_size: int = 32, patch_size: int = 4) -> MaskedAutoencoder:
    return MaskedAutoencoder(
        spatial_dims=spatial_dims,
        image_size=image_size,
        in_channels=1,
        patch_size=patch_size,
        encoder_dim=24,
        encoder_depth=1,
        encoder_heads=2,
        decoder_dim=12,
        decoder_depth=1,
        decoder_heads=2,
    )


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Blurred noise in [0, 1]: structured enough for a tiny MAE to learn within a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 8, size // 8, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from a second thread, and on a shared 2-core machine two spinning
    # threads per process slow these tests down several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> MAEClassifier:
    torch.manual_seed(0)
    method = MAEClassifier.build("tiny")
    # The head starts near zero (every score 1/2): widen it so that scores depend on the input.
    torch.nn.init.normal_(method.classifier.head.weight, std=1.0)
    return method


# -- the masked autoencoder ----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_mask_drops_exactly_round_alpha_n_tokens(alpha: float) -> None:
    mae = tiny_mae()  # 64 tokens
    n = mae.n_tokens
    image = torch.rand(3, 1, 32, 32)
    out = mae(image, alpha)
    assert out.mask.shape == (3, n)
    assert out.mask.sum(dim=1).tolist() == [round(alpha * n)] * 3
    for shared in (False, True):
        ids_keep, mask = mae.random_mask(3, alpha, image.device, torch.Generator().manual_seed(1), shared)
        assert ids_keep.shape == (3, n - round(alpha * n))
        assert mask.sum(dim=1).tolist() == [round(alpha * n)] * 3
        assert not mask.gather(1, ids_keep).any()
        if shared:
            assert (mask == mask[:1]).all()


def test_patchify_round_trip_2d_and_3d() -> None:
    for dims, size in ((2, 32), (3, 16)):
        mae = tiny_mae(dims, size)
        image = torch.rand(2, 1, *([size] * dims))
        patches = mae.patchify(image)
        assert patches.shape == (2, mae.n_tokens, 4**dims)
        assert torch.equal(mae.unpatchify(patches), image)
    # Token order follows the conv patch embedding: token 1 is the patch right of token 0.
    mae = tiny_mae()
    image = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)
    assert torch.equal(mae.patchify(image)[0, 1].reshape(4, 4), image[0, 0, :4, 4:8])


def test_loss_on_masked_tokens_differs_from_all_token_loss() -> None:
    torch.manual_seed(0)
    mae = tiny_mae()
    out = mae(torch.rand(2, 1, 32, 32), 0.75)
    masked = mae.loss(out)
    every = mae.loss(out, on_all_tokens=True)
    per_token = (out.prediction - out.target).pow(2).mean(-1)
    assert torch.allclose(masked, per_token[out.mask].mean())
    assert torch.allclose(every, per_token.mean())
    assert not torch.allclose(masked, every)
    # alpha = 0 (the autoencoder ablation): nothing is masked, every token is reconstructed.
    out0 = mae(torch.rand(2, 1, 32, 32), 0.0)
    assert torch.allclose(mae.loss(out0), (out0.prediction - out0.target).pow(2).mean())


def test_reconstruction_keeps_visible_patches_and_averages_passes() -> None:
    torch.manual_seed(0)
    mae = tiny_mae()
    image = torch.rand(2, 1, 32, 32)
    recon = mae.reconstruct(
        image, 0.75, n_passes=1, generator=torch.Generator().manual_seed(5), shared_mask=True
    )
    out = mae(image, 0.75, generator=torch.Generator().manual_seed(5), shared_mask=True)
    visible = ~out.mask
    assert torch.equal(mae.patchify(recon)[visible], mae.patchify(image)[visible])
    assert torch.allclose(mae.patchify(recon)[out.mask], out.prediction[out.mask])
    assert not torch.allclose(recon, image)

    # Four passes: the mean of four single-pass reconstructions with successive masks.
    g = torch.Generator().manual_seed(9)
    singles = [mae.reconstruct(image, 0.75, n_passes=1, generator=g, shared_mask=True) for _ in range(4)]
    averaged = mae.reconstruct(
        image, 0.75, n_passes=4, generator=torch.Generator().manual_seed(9), shared_mask=True
    )
    assert torch.allclose(averaged, torch.stack(singles).mean(0), atol=1e-6)
    # Without pasting, visible patches come from the decoder.
    raw = mae.reconstruct(
        image, 0.75, n_passes=1, paste_visible=False, generator=torch.Generator().manual_seed(5)
    )
    assert not torch.allclose(mae.patchify(raw)[visible], mae.patchify(image)[visible])


def test_method_reconstruction_pastes_only_when_trained_on_masked_tokens() -> None:
    image = smooth_images(2)
    for overrides, pasted in (
        ({}, True),
        ({"loss_on_all_tokens": True}, False),
        ({"mask_ratio": 0.0}, False),
    ):
        torch.manual_seed(0)
        method = MAEClassifier.build("tiny", **overrides)
        recon = method.reconstruct(image, generator=torch.Generator().manual_seed(0))
        # With pasting, patches visible in all four passes equal the input exactly.
        equal_patches = (method.mae.patchify(recon) == method.mae.patchify(image)).all(-1)
        assert bool(equal_patches.any()) is pasted, overrides


# -- the pseudo-abnormal module ------------------------------------------------------------------


def test_pseudo_abnormal_boxes_count_size_and_placement() -> None:
    transform = PseudoAbnormalBoxes(k_range=(2, 6), box_size_range=(5, 12), seed=3)
    image = torch.rand(2, 40, 50) + 0.5
    counts = set()
    for _ in range(40):
        out = transform(image)
        k = len(transform.boxes)
        counts.add(k)
        assert 2 <= k <= 6 and len(transform.betas) == k
        expected = image.clone()
        outside = torch.ones(40, 50, dtype=torch.bool)
        for box, beta in zip(transform.boxes, transform.betas):
            for s, size in zip(box, image.shape[1:]):
                assert 0 <= s.start < s.stop <= size
                assert 5 <= s.stop - s.start <= 12
            assert isinstance(beta, float) and 0.0 <= beta < 1.0
            expected[(slice(None), *box)] *= beta
            outside[box] = False
        assert torch.allclose(out, expected)
        assert torch.equal(out[:, outside], image[:, outside])
    assert counts == {2, 3, 4, 5, 6}
    assert torch.all(image >= 0.5)  # the input is left untouched


def test_pseudo_abnormal_single_beta_per_box_or_per_pixel() -> None:
    image = torch.rand(1, 64, 64) + 0.5
    one = PseudoAbnormalBoxes(k_range=(1, 1), box_size_range=(5, 12), seed=0)
    out = one(image)
    (box,) = one.boxes
    ratio = (out / image)[(slice(None), *box)]
    assert torch.allclose(ratio, torch.full_like(ratio, one.betas[0]), atol=1e-6)

    per_pixel = PseudoAbnormalBoxes(k_range=(1, 1), box_size_range=(5, 12), beta_per_pixel=True, seed=0)
    out = per_pixel(image)
    (box,) = per_pixel.boxes
    (beta,) = per_pixel.betas
    ratio = (out / image)[(slice(None), *box)][0]
    assert isinstance(beta, np.ndarray) and beta.shape == tuple(ratio.shape)
    assert torch.allclose(ratio, torch.as_tensor(beta), atol=1e-6)
    assert ratio.std() > 0.05 and ratio.min() >= 0 and ratio.max() < 1


def test_pseudo_abnormal_min_change_redraws_boxes_that_change_nothing() -> None:
    # Left half background (0), right half tissue: a box wholly on the background changes nothing.
    image = torch.zeros(1, 32, 32)
    image[:, :, 24:] = 1.0
    plain = PseudoAbnormalBoxes(k_range=(1, 1), box_size_range=(4, 4), seed=0)
    unchanged = sum(float((plain(image) - image).abs().sum()) == 0.0 for _ in range(100))
    assert unchanged > 50  # without the check, most draws are positives equal to their negative
    checked = PseudoAbnormalBoxes(k_range=(1, 1), box_size_range=(4, 4), seed=0, min_change=2.0)
    for _ in range(100):
        out = checked(image)
        assert float((out - image).abs().sum()) >= 2.0
        (box,) = checked.boxes  # the boxes left on the instance are the ones applied
        expected = image.clone()
        expected[(slice(None), *box)] *= checked.betas[0]
        assert torch.allclose(out, expected)
    # An image nothing can change (all background) ends after max_redraws with the last draw.
    empty = torch.zeros(1, 32, 32)
    assert torch.equal(checked(empty), empty)
    with pytest.raises(ValueError):
        PseudoAbnormalBoxes(min_change=-1.0)


def test_pseudo_abnormal_is_reproducible_and_works_on_batches_and_3d() -> None:
    batch = torch.rand(3, 1, 16, 16, 16)
    a = pseudo_abnormal_boxes(batch, PseudoAbnormalBoxes((1, 4), (2, 6), seed=7))
    b = pseudo_abnormal_boxes(batch, PseudoAbnormalBoxes((1, 4), (2, 6), seed=7))
    assert a.shape == batch.shape and torch.equal(a, b)
    assert not torch.equal(a, batch)
    # Boxes larger than the image are cut to it.
    big = PseudoAbnormalBoxes((1, 1), (40, 40), seed=0)
    big(torch.rand(1, 8, 8))
    assert big.boxes[0] == (slice(0, 8), slice(0, 8))


# -- the method ----------------------------------------------------------------------------------


def test_classifier_input_switches_change_the_input() -> None:
    x = torch.rand(2, 1, 64, 64)
    r = torch.rand(2, 1, 64, 64)
    inputs = {}
    for kind in ("abs_diff", "l2_diff", "reconstruction"):
        method = MAEClassifier.build("tiny", classifier_input=kind)
        inputs[kind] = method.classifier_input(x, r)
    assert torch.allclose(inputs["abs_diff"], (r - x).abs())
    assert torch.allclose(inputs["l2_diff"], (r - x) ** 2)
    assert torch.equal(inputs["reconstruction"], r)
    kinds = list(inputs)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert not torch.allclose(inputs[a], inputs[b])


def test_training_steps_lower_the_loss_in_both_stages() -> None:
    torch.manual_seed(0)
    # Ten 10-16 px boxes per positive: a signal clear enough to learn in a few steps.
    method = MAEClassifier.build("tiny", k_range=(10, 10), box_size_range=(10, 16))
    assert [s.name for s in method.stages()] == ["mae", "classifier"]
    batch = {"image": smooth_images(8)}

    def fixed_loss(stage: str) -> float:
        torch.manual_seed(123)  # fixes the masks and the pseudo-abnormal boxes
        with torch.no_grad():
            return float(method.training_step(batch, stage)["loss"])

    for stage, steps in (("mae", 15), ("classifier", 20)):
        optimizer = method.configure_optimizers(stage)["main"]
        before = fixed_loss(stage)
        for _ in range(steps):
            losses = method.training_step(batch, stage)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        after = fixed_loss(stage)
        assert after < 0.8 * before, (stage, before, after)


def test_eval_mode_training_step_changes_no_state() -> None:
    """The platform's val_loss (training_step under eval() + no_grad) is side-effect free."""
    torch.manual_seed(0)
    method = MAEClassifier.build("tiny")
    batch = {"image": smooth_images(4)}
    for stage in ("mae", "classifier"):  # one training step per stage, as after some epochs
        optimizer = method.configure_optimizers(stage)["main"]
        method.train()
        method.training_step(batch, stage)["loss"].backward()
        optimizer.step()
    method.eval()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    scores = method.score(batch).sample
    rng = torch.get_rng_state()
    with torch.no_grad():
        losses = {
            stage: [float(method.training_step(batch, stage)["loss"]) for _ in range(2)]
            for stage in ("mae", "classifier")
        }
    for stage, (first, second) in losses.items():
        assert first == second, stage  # deterministic: fixed masks and boxes, not the global RNG
    assert torch.equal(torch.get_rng_state(), rng)
    after = method.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(method.score(batch).sample, scores)
    # Training mode still draws new masks and boxes from the global RNG at every step.
    method.train()
    with torch.no_grad():
        a, b = (float(method.training_step(batch, "classifier")["loss"]) for _ in range(2))
    assert a != b


def test_stages_freeze_the_other_network() -> None:
    method = MAEClassifier.build("tiny")
    fixed = [method.mae.patch_embedding.position_embeddings, method.mae.decoder_pos_embedding]
    groups = method.configure_optimizers("classifier")["main"].param_groups
    optimized = {id(p) for g in groups for p in g["params"]}
    assert optimized == {id(p) for p in method.classifier.parameters()}
    assert not any(p.requires_grad for p in method.mae.parameters())
    groups = method.configure_optimizers("mae")["main"].param_groups
    optimized = {id(p) for g in groups for p in g["params"]}
    assert optimized == {id(p) for p in method.mae.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in fixed) and all(id(p) not in optimized for p in fixed)
    assert not any(p.requires_grad for p in method.classifier.parameters())
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="unknown stage"):
        method.configure_optimizers("finetune")


def test_scores_shapes_ranges_and_determinism(tiny: MAEClassifier) -> None:
    tiny.eval()
    image = smooth_images(5)
    scores = tiny.score({"image": image})
    assert scores.sample.shape == (5,)
    assert scores.map is not None and scores.map.shape == (5, 1, 64, 64)
    assert torch.all((scores.sample >= 0) & (scores.sample <= 1))
    assert torch.all(scores.map >= 0)
    # Same input, same score: across calls and whatever else is in the batch.
    again = tiny.score({"image": image})
    assert torch.equal(scores.sample, again.sample) and torch.equal(scores.map, again.map)
    assert scores.sample.std() > 1e-3  # the scores do depend on the image
    alone = tiny.score({"image": image[2:3]})
    assert torch.allclose(alone.sample, scores.sample[2:3], atol=1e-5)
    assert torch.allclose(alone.map, scores.map[2:3], atol=1e-5)


@pytest.mark.parametrize("kind", ["mse", "mae", "ssim"])
def test_mae_only_scores(kind: str) -> None:
    torch.manual_seed(0)
    method = MAEClassifier.build("tiny", score=kind).eval()
    assert [s.name for s in method.stages()] == ["mae"]  # Table 2a: no classifier
    image = smooth_images(3)
    scores = method.score({"image": image})
    assert scores.sample.shape == (3,) and scores.map is not None and scores.map.shape == (3, 1, 64, 64)
    assert torch.isfinite(scores.sample).all() and (scores.sample >= 0).all()
    recon = method.reconstruct(image, generator=torch.Generator().manual_seed(method.config.seed))
    assert torch.allclose(scores.map, (image - recon).abs())
    if kind == "mse":
        assert torch.allclose(scores.sample, (image - recon).pow(2).flatten(1).mean(1))
    elif kind == "mae":
        assert torch.allclose(scores.sample, (image - recon).abs().flatten(1).mean(1))


def test_checkpoint_round_trip_gives_identical_scores(tiny: MAEClassifier) -> None:
    buffer = io.BytesIO()
    torch.save(tiny.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    assert isinstance(restored, MAEClassifier) and restored.config == tiny.config
    tiny.eval()
    image = smooth_images(4, seed=1)
    a, b = tiny.score({"image": image}), restored.score({"image": image})
    assert torch.equal(a.sample, b.sample) and torch.equal(a.map, b.map)


def test_three_dimensional_volumes() -> None:
    method = MAEClassifier.build(
        "tiny",
        spatial_dims=3,
        image_size=16,
        patch_size=4,
        encoder_dim=24,
        encoder_heads=2,
        decoder_dim=12,
        decoder_heads=2,
        classifier_patch_size=4,
        classifier_dim=16,
        classifier_heads=2,
        box_size_range=(2, 6),
    )
    batch = {"image": torch.rand(2, 1, 16, 16, 16)}
    for stage in ("mae", "classifier"):
        method.configure_optimizers(stage)
        assert torch.isfinite(method.training_step(batch, stage)["loss"])
    scores = method.eval().score(batch)
    assert scores.sample.shape == (2,) and scores.map.shape == (2, 1, 16, 16, 16)


def test_paper_preset_matches_the_paper() -> None:
    c = get("mae_classifier").make_config("paper")
    # Sec. 4.3: ViT-Base encoder (ViT-B/16 [11]: 768-d, 12 blocks, 12 heads), 224 x 224 x 1 input.
    assert (c.image_size, c.in_channels, c.spatial_dims) == (224, 1, 2)
    assert (c.patch_size, c.encoder_dim, c.encoder_depth, c.encoder_heads) == (16, 768, 12, 12)
    # Sec. 4.3: decoder of He et al. with 512-d embeddings, 8 blocks, 16 heads.
    assert (c.decoder_dim, c.decoder_depth, c.decoder_heads) == (512, 8, 16)
    # Sec. 4.3 and Fig. 5: mask ratio 0.75, 1600 epochs; 4 averaged reconstructions.
    assert (c.mask_ratio, c.mae_epochs, c.n_reconstructions) == (0.75, 1600, 4)
    assert c.loss_on_all_tokens is False  # Eq. (1): masked tokens only
    # Sec. 4.3: pseudo-abnormal k ~ U[1, 10], sides 10-40 px (BRATS2020), one beta per box (Sec. 3.3).
    assert (c.k_range, c.box_size_range, c.beta_per_pixel) == ((1, 10), (10, 40), False)
    # Sec. 4.3: classifier ViT-Base, 100 epochs, AdamW lr 0.001, weight decay 0.05.
    assert (c.classifier_patch_size, c.classifier_dim, c.classifier_depth, c.classifier_heads) == (
        16,
        768,
        12,
        12,
    )
    assert (c.classifier_epochs, c.classifier_lr, c.classifier_weight_decay) == (100, 1e-3, 0.05)
    # Sec. 3.4 and Table 2b: the classifier's input is |X^ - X| and it gives the score.
    assert (c.classifier_input, c.score) == ("abs_diff", "classifier")
    # Official MAE optimizer (the paper trains with it, Sec. 4.3): AdamW (0.9, 0.95), wd 0.05.
    assert (c.mae_betas, c.mae_weight_decay) == ((0.9, 0.95), 0.05)


def test_invalid_configs_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="known: classifier, mse, mae, ssim"):
        MAEClassifier.make_config("tiny", {"score": "l1"})
    with pytest.raises(ValueError, match="abs_diff, l2_diff, reconstruction"):
        MAEClassifier.make_config("tiny", {"classifier_input": "diff"})
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEClassifier.make_config("tiny", {"mask_ratio": 1.0})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        MAEClassifier.make_config("tiny", {"patch_size": 7})
    config = MAEClassifier.make_config("tiny", {"k_range": "2,5", "beta_per_pixel": "true"})
    assert config.k_range == (2, 5) and config.beta_per_pixel is True
