"""dino_negatives (Rafiee thesis ch. 6-7): losses, centring, EMA and schedules, shifts, ViT, scores, sensitivity."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medood import methods
from medood.methods.base import AnomalyMethod
from medood.methods.components.feature_reference import FeatureReference, cosine_scores
from medood.methods.components.multicrop_vit import MultiCropViT
from medood.methods.components.views import permute_patches, permute_pixels, rotate90, shift
from medood.methods.dino_negatives import collapse_monitors, dino_positive_loss, uniform_negative_loss
from medood.platform.metrics import label_free_sensitivity


def build(**overrides):
    torch.manual_seed(0)
    return methods.get("dino_negatives").build("tiny", **overrides)


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.2
    x[:, :, size // 4 : size // 2, size // 8 : 3 * size // 4] += 0.7
    return x


# -- losses ----------------------------------------------------------------------------------------


def test_negative_loss_is_cross_entropy_to_uniform():
    k = 7
    constant = [torch.full((3, k), 2.5)]
    assert float(uniform_negative_loss(constant, 0.1)) == pytest.approx(math.log(k), rel=1e-6)
    logits = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits / 0.1, torch.full((5, k), 1.0 / k))
    torch.testing.assert_close(uniform_negative_loss([logits], 0.1), expected)
    assert float(uniform_negative_loss([logits], 0.1)) > math.log(k)
    at_uniform = torch.zeros(2, k, requires_grad=True)
    uniform_negative_loss([at_uniform], 0.1).backward()
    torch.testing.assert_close(at_uniform.grad, torch.zeros(2, k))
    # "sum" adds the views, "mean" averages them
    two = [logits, logits * 2]
    torch.testing.assert_close(uniform_negative_loss(two, 0.1, "sum"), 2 * uniform_negative_loss(two, 0.1, "mean"))


def test_positive_loss_equals_brute_force_eq3():
    g = torch.Generator().manual_seed(0)
    k, tau_s = 3, 0.1
    student = [torch.randn(2, k, generator=g) for _ in range(3)]  # 2 global + 1 local
    p_t = F.softmax(torch.randn(2, 2, k, generator=g) / 0.04, dim=-1)
    total, pairs = 0.0, 0
    for b in range(2):
        for iq in range(2):  # teacher: global views only
            for v in range(3):
                if v == iq:  # same view skipped
                    continue
                log_p = F.log_softmax(student[v][b] / tau_s, dim=-1)
                total += float(-(p_t[iq, b] * log_p).sum())
                pairs += 1
    assert float(dino_positive_loss(student, p_t, tau_s)) == pytest.approx(total / pairs, rel=1e-6)


# -- centring, EMA, schedules ----------------------------------------------------------------------


def test_centre_starts_at_the_first_batch_mean_then_moves_by_momentum_and_ignores_negatives():
    method = build()
    method.train()
    x = {"image": images()}
    torch.manual_seed(1)
    method.training_step(x, "dino")
    assert bool(method.center_initialized)
    c1 = method.center.clone()
    # the update rule: c' = 0.9 c + 0.1 mean(teacher global logits)
    torch.manual_seed(2)
    views = method.positive_views(x["image"])
    torch.manual_seed(2)
    with torch.no_grad():
        method._ema_update()  # the step applies it before the teacher's forward; replay it on a copy
    expected_mean = torch.stack(method._logits(method.teacher, views[:2])).mean(dim=(0, 1))
    method.center.copy_(c1)
    torch.manual_seed(2)
    method.training_step(x, "dino")
    torch.testing.assert_close(method.center[0], 0.9 * c1[0] + 0.1 * expected_mean, rtol=1e-4, atol=1e-5)
    # negatives never touch c: the same step with and without them gives the same centre
    centres = []
    for lam in (0.0, 1.0):
        m = build(lam=lam)
        m.train()
        torch.manual_seed(3)
        m.training_step(x, "dino")
        centres.append(m.center.clone())
    torch.testing.assert_close(centres[0], centres[1])


def test_ema_copies_the_student_at_momentum_zero_and_nothing_changes_under_no_grad_or_eval():
    method = build(momentum_start=0.0)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.1)
    method.train()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        method.training_step({"image": images()}, "dino")
    method.eval()
    method.training_step({"image": images()}, "dino")
    after = method.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    method.train()
    method.training_step({"image": images()}, "dino")
    for a, b in zip(method.student.parameters(), method.teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
def test_schedule_endpoints():
    method = build(epochs=10, warmup_epochs=2, teacher_temp_start=0.04, teacher_temp_end=0.01, momentum_start=0.99)
    method.epoch.fill_(0)
    assert method.teacher_temperature() == pytest.approx(0.04) and method.teacher_momentum() == pytest.approx(0.99)
    method.epoch.fill_(9)
    assert method.teacher_temperature() == pytest.approx(0.01) and method.teacher_momentum() == pytest.approx(1.0)
    c = method.config
    base = c.lr_base * c.batch_size / 256
    assert method.lr_factor(0) == pytest.approx(0.5) and method.lr_factor(2) == pytest.approx(1.0)
    assert method.lr_factor(10) * base == pytest.approx(c.min_lr)
    assert method.weight_decay_at(0) == pytest.approx(c.weight_decay)
    assert method.weight_decay_at(9) == pytest.approx(c.weight_decay_end)
    optimizers = method.configure_optimizers("dino")
    scheduler = method.configure_schedulers("dino", optimizers)["main"]
    for _ in range(3):
        scheduler.step()
    assert int(method.epoch) == 3
    decayed = [g for g in optimizers["main"].param_groups if g["apply_decay"]][0]
    assert decayed["weight_decay"] == pytest.approx(method.weight_decay_at(3))
    assert optimizers["main"].param_groups[0]["lr"] == pytest.approx(base * method.lr_factor(3))
    assert "_method" not in scheduler.state_dict()


# -- shifting transformations ----------------------------------------------------------------------


def test_rotation_negatives_are_right_angles_never_identity():
    x = torch.rand(32, 1, 8, 8)
    torch.manual_seed(0)
    y = shift(x, "rot")
    for a, b in zip(x, y, strict=True):
        matches = [k for k in range(4) if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b)]
        assert matches and matches[0] in (1, 2, 3)
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    torch.testing.assert_close(rotate90(x, torch.full((32,), 2)), x.flip(-1).flip(-2))


def test_permutations_preserve_patches_and_pixels():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    torch.manual_seed(0)
    for grid in (2, 4):
        y = permute_patches(x, grid)
        p = 16 // grid

        def patches(img, p=p, grid=grid):
            return sorted(tuple(img[0, i * p:(i + 1) * p, j * p:(j + 1) * p].flatten().tolist())
                          for i in range(grid) for j in range(grid))

        for a, b in zip(x, y, strict=True):
            assert patches(a) == patches(b)
    y = permute_pixels(x)
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values) and not torch.equal(a, b)


# -- ViT -------------------------------------------------------------------------------------------


def test_multicrop_vit_takes_global_and_local_views():
    vit = MultiCropViT(3, 256, 16, dim=32, depth=1, heads=2).eval()
    with torch.no_grad():
        assert vit(torch.rand(2, 3, 256, 256)).shape == (2, 32)
        assert vit(torch.rand(2, 3, 96, 96)).shape == (2, 32)
    assert vit.interpolate_pos_encoding(16, 16) is vit.pos_embed
    assert vit.interpolate_pos_encoding(6, 6).shape == (1, 37, 32)


# -- scores, self-match, sensitivity ---------------------------------------------------------------


def test_cosine_scores_match_the_equations_and_exclude_self_matches():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    query = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    tau = 0.04
    brute = -torch.exp((query.double() @ bank.double().T) / tau).mean(1)
    ours = cosine_scores(query, bank, "cos_avg", tau)
    assert np.array_equal(np.argsort(ours.numpy()), np.argsort(brute.numpy()))
    torch.testing.assert_close(cosine_scores(query, bank, "cos_max", tau),
                               -torch.exp((query.double() @ bank.double().T).max(1).values))
    reference = FeatureReference(8, "cos_max", temperature=tau)
    ids = [f"c{i}" for i in range(20)]
    reference.fit(bank, ids)
    own = reference.score(bank[:3], ids[:3])
    assert (own > -math.e + 1e-6).all()  # a self-match would give -exp(1)
    for i in range(3):
        rest = torch.cat([bank[:i], bank[i + 1:]])
        torch.testing.assert_close(own[i], cosine_scores(bank[i:i + 1], rest, "cos_max", tau).float()[0])


def test_sensitivity_score_is_roc_auc_and_uses_a_reference_without_the_held_out_cases():
    rng = np.random.default_rng(0)
    held, test = rng.normal(size=30), rng.normal(size=40) + 0.5
    labels = np.r_[np.zeros(30), np.ones(40)]
    assert label_free_sensitivity(held, test) == pytest.approx(roc_auc_score(labels, np.r_[held, test]))
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.eye(8)[0] * 2, torch.eye(8)[1] * 2

    def draw(n, centre):
        return F.normalize(torch.randn(n, 8, generator=g) * 0.5 + centre, dim=1)

    train = draw(400, e1)
    ids = [f"t{i}" for i in range(400)]
    reference = FeatureReference(8, "cos_avg", temperature=0.1, sensitivity_fraction=0.2)
    reference.fit(train, ids)
    sens = reference.sensitivity_reference()
    assert 40 < len(sens) < 120
    iid = reference.sensitivity_scores(draw(200, e1))
    shifted = reference.sensitivity_scores(draw(200, e1 * 0.7 + e2 * 0.7))
    assert abs(label_free_sensitivity(sens.numpy(), iid.numpy()) - 0.5) < 0.1
    assert label_free_sensitivity(sens.numpy(), shifted.numpy()) > 0.8
    again = FeatureReference(8, "cos_avg", temperature=0.1, sensitivity_fraction=0.2)
    order = np.random.default_rng(1).permutation(400)
    again.fit(train[order], [ids[i] for i in order])  # the split is by id, not by position
    torch.testing.assert_close(again.sensitivity_reference().sort().values, sens.sort().values)
    ref_bank = reference.sensitivity["stats"]["bank"]
    assert len(ref_bank) + len(sens) == 400  # D_train^sens is not in the reference


def test_checkpoint_round_trip_with_a_variable_size_bank():
    method = build(score="cos_avg")
    method.eval()
    batch = {"image": images(5), "id": [f"c{i}" for i in range(5)]}
    method.fit_reference([batch])
    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    assert restored.reference.bank.shape == (5, method.config.embed_dim)
    torch.testing.assert_close(restored.score(batch).sample, method.score(batch).sample)


def test_collapse_monitors_and_step_outputs():
    method = build()
    method.train()
    out = method.training_step({"image": images()}, "dino")
    k = method.config.out_dim
    for key in ("teacher_entropy", "teacher_mean_entropy", "occupied_classes", "loss_pos", "loss_neg", "neg_excess"):
        assert torch.isfinite(out[key])
    assert 0 <= float(out["teacher_entropy"]) <= math.log(k) + 1e-4
    assert float(out["neg_excess"]) >= -1e-5  # L_neg >= log K
    one_hot = F.one_hot(torch.tensor([0, 0, 0]), 4).float()[None]
    monitors = collapse_monitors(one_hot)
    assert float(monitors["teacher_entropy"]) == pytest.approx(0, abs=1e-6)
    assert float(monitors["teacher_mean_entropy"]) == pytest.approx(0, abs=1e-6)
    uniform = torch.full((1, 3, 4), 0.25)
    assert float(collapse_monitors(uniform)["teacher_entropy"]) == pytest.approx(math.log(4), rel=1e-6)


def test_auxiliary_negatives_need_aux_images():
    method = build(neg_source="aux")
    method.train()
    with pytest.raises(ValueError, match="aux_image"):
        method.training_step({"image": images()}, "dino")
    out = method.training_step({"image": images(), "aux_image": torch.rand(4, 3, 80, 80)}, "dino")
    assert torch.isfinite(out["loss"])
