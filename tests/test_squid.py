"""Unit tests of SQUID (medood/methods/squid.py and its components); no Ray, tiny tensors."""

from __future__ import annotations

import io

import pytest
import torch

from medood.methods import get
from medood.methods.base import AnomalyMethod
from medood.methods.components.inpainting import (
    InpaintingBlock,
    gather_neighbours,
    masked_shortcut,
    neighbour_index,
)
from medood.methods.components.memory import (
    SpaceAwareMemoryMatrix,
    SpaceAwareMemoryQueue,
    gumbel_shrinkage,
    memory_read,
    similarities,
)
from medood.methods.squid import Squid, from_patches, to_patches

# Smaller than the tiny preset (which one test runs as is), so that the file stays fast on 2 shared cores.
MICRO = {
    "image_size": 32, "channels": (4, 8, 16), "discriminator_channels": (4, 8, 8, 16, 16),
    "memory_size": 8, "memory_matrix_size": 8, "inpaint_heads": 2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two intra-op threads on a machine whose 2 cores are shared run several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _micro(**overrides) -> Squid:
    torch.manual_seed(0)
    return Squid.build("tiny", **{**MICRO, **overrides})


def _images(batch: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _step(method: AnomalyMethod, optimizers: dict, batch: dict) -> dict[str, torch.Tensor]:
    """One platform iteration: each loss back-propagated into its own optimizer's parameters only."""
    losses = method.training_step(batch, "train")
    for name, optimizer in optimizers.items():
        key = "loss" if name == "main" else f"loss_{name}"
        if key not in losses:
            continue
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = torch.autograd.grad(losses[key], params, allow_unused=True)
        optimizer.zero_grad()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
    return losses


# -- config -----------------------------------------------------------------------------------


def test_paper_config_is_the_thesis():
    c = Squid.make_config("paper")
    assert get("squid") is Squid
    # §4.1.5 (implementation details): 128 x 128, batch 16, Adam lr 1e-4 (G and D), weight decay 1e-5,
    # 1,000 epochs, loss weights, rho = 95 %, top-5, 2 x 2 patches, G every second iteration.
    assert (c.image_size, c.batch_size, c.epochs) == (128, 16, 1000)
    assert (c.lr, c.lr_discriminator, c.weight_decay) == (1e-4, 1e-4, 1e-5)
    assert c.weight_decay_discriminator == 0.0  # not in the thesis: the authors' code (notes, appendix A)
    assert (c.lambda_t, c.lambda_s, c.lambda_dist, c.lambda_gen, c.lambda_dis) == (0.01, 10.0, 0.001, 0.005, 0.005)
    assert (c.shortcut_probability, c.top_k, c.grid, c.generator_period) == (0.95, 5, 2, 2)
    # §4.4 / Fig. 4.6: 200 items per memory region.
    assert c.memory_size == 200
    # Tables 3.1-3.3: encoder / generator channels and the discriminator's.
    assert c.channels == (32, 64, 128, 256)
    assert c.discriminator_channels == (16, 32, 64, 128, 128)
    assert (c.spatial_dims, c.in_channels) == (2, 1)


def test_config_parses_cli_strings_and_rejects_bad_values():
    c = Squid.make_config("tiny", {"memory": "matrix", "space_aware": "false", "top_k": "3"})
    assert (c.memory, c.space_aware, c.top_k) == ("matrix", False, 3)
    with pytest.raises(ValueError, match="unknown shortcut 'hard'; known: masked, soft, none"):
        Squid.make_config("tiny", {"shortcut": "hard"})
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        Squid.make_config("tiny", {"spatial_dims": 3})
    with pytest.raises(ValueError, match="grid 3 must be >= 1 and divide image_size 64"):
        Squid.make_config("tiny", {"grid": 3})


# -- memory -----------------------------------------------------------------------------------


def test_memory_queue_writes_fifo_per_region_and_wraps_around():
    queue = SpaceAwareMemoryQueue(regions=2, size=3, dim=1)

    def batch(*values: float) -> torch.Tensor:  # region r of item b holds value + 100 r
        return torch.tensor([[[v], [v + 100]] for v in values])

    queue.write(batch(1, 2))
    assert queue.items[:, :, 0].tolist() == [[1, 2, 0], [101, 102, 0]]
    assert (int(queue.pointer), int(queue.filled)) == (2, 2)
    assert queue.valid().tolist() == [[True, True, False]] * 2
    queue.write(batch(3, 4))  # slot 2, then wraps to overwrite the oldest (slot 0)
    assert queue.items[:, :, 0].tolist() == [[4, 2, 3], [104, 102, 103]]
    assert (int(queue.pointer), int(queue.filled)) == (1, 3)
    queue.write(batch(5, 6, 7, 8))  # more than the queue holds: the newest 3 survive, in FIFO slots
    assert queue.items[:, :, 0].tolist() == [[7, 8, 6], [107, 108, 106]]  # 5->1, 6->2, 7->0, 8->1
    assert int(queue.pointer) == 2
    with pytest.raises(ValueError, match="expects features of shape"):
        queue.write(torch.zeros(2, 3, 1))


def test_memory_queue_reads_only_filled_slots_and_each_cell_its_own_region():
    queue = SpaceAwareMemoryQueue(regions=2, size=4, dim=2, top_k=5)
    query = torch.ones(1, 2, 2)
    assert torch.equal(queue.read(query), torch.zeros(1, 2, 2))  # empty queue reads zeros
    queue.write(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
    # One filled slot per region: each cell gets exactly its region's item, never the empty (zero) slots.
    assert torch.allclose(queue.read(query), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))


def test_gumbel_shrinkage_forward_is_hard_top_k_and_backward_reaches_all_items():
    torch.manual_seed(0)
    similarity = torch.randn(3, 12, requires_grad=True)
    weights = gumbel_shrinkage(similarity, k=5)
    top = torch.topk(similarity.detach(), 5, dim=-1).indices
    nonzero = weights.detach() != 0
    assert nonzero.sum(dim=-1).tolist() == [5, 5, 5]
    assert torch.equal(nonzero, torch.zeros_like(nonzero).scatter_(-1, top, True))
    # The kept weights are the softmax over the top-k similarities.
    expected = torch.softmax(torch.gather(similarity.detach(), -1, top), dim=-1)
    assert torch.allclose(torch.gather(weights.detach(), -1, top), expected)
    # Backward is the softmax's: gradient on the items outside the top-k too.
    (weights * torch.randn(3, 12)).sum().backward()
    outside = similarity.grad[~nonzero]
    assert outside.abs().min() > 0


def test_memory_matrix_items_outside_top_k_get_gradients():
    torch.manual_seed(0)
    memory = SpaceAwareMemoryMatrix(regions=2, size=20, dim=8, top_k=3)
    out = memory(torch.randn(4, 2, 8))
    out.pow(2).sum().backward()
    rows_with_grad = (memory.items.grad.abs().sum(dim=-1) > 0).sum(dim=-1)
    assert (rows_with_grad > 3 * 4).all()  # more items than the 4 queries' top-3 could reach in forward
    # Region r only ever sees cell r: cell 0's query never touches region 1.
    memory.zero_grad()
    queries = torch.randn(1, 2, 8)
    queries[:, 1] = 0
    reads = memory_read(queries, memory.items, top_k=3)
    reads[:, 0].sum().backward()
    assert memory.items.grad[1].abs().sum() == 0


# -- in-painting block --------------------------------------------------------------------------


def test_neighbours_interior_and_borders():
    index, valid = neighbour_index(3)
    assert index[4].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]  # the centre cell sees all 8 cells around it
    assert valid[4].all()
    # Corner (0, 0): only right (0,1)=1, below (1,0)=3 and diagonal (1,1)=4 exist; the rest are padding (9).
    assert index[0].tolist() == [9, 9, 9, 9, 1, 9, 3, 4]
    assert valid[0].tolist() == [False, False, False, False, True, False, True, True]
    # Edge (1, 2) = cell 5: left column and rows above / below exist, the right column does not.
    assert index[5].tolist() == [1, 2, 9, 4, 9, 7, 8, 9]
    assert neighbour_index(2)[1].sum(dim=-1).tolist() == [3, 3, 3, 3]
    assert not neighbour_index(1)[1].any()

    tokens = torch.arange(1, 10, dtype=torch.float).reshape(1, 9, 1)
    neighbours, valid = gather_neighbours(tokens, 3)
    assert neighbours[0, 0, :, 0].tolist() == [0, 0, 0, 0, 2, 0, 4, 5]  # zero padding where none exists
    assert neighbours[0, 4, :, 0].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


def test_masked_shortcut_is_stochastic_in_training_and_deterministic_at_inference():
    features, inpainted = torch.zeros(8, 2, 4, 4), torch.ones(8, 2, 4, 4)
    torch.manual_seed(0)
    train = masked_shortcut(features, inpainted, "masked", 0.5, training=True)
    assert set(train.unique().tolist()) == {0.0, 1.0}  # each position is either F or inpaint(F) (Eq. 3.3)
    assert torch.equal(train[:, 0], train[:, 1])  # one gate per spatial position, shared by the channels
    assert torch.equal(masked_shortcut(features, inpainted, "masked", 0.5, training=False), inpainted)  # Eq. 3.4
    assert torch.allclose(masked_shortcut(features, inpainted, "soft", 0.95, training=False), torch.full_like(inpainted, 0.95))

    torch.manual_seed(0)
    block = InpaintingBlock(channels=16, grid=2, feature_size=2, heads=2, memory_size=8, shortcut_probability=0.5)
    block.memory.write(torch.randn(8, 4, block.dim))
    x = torch.randn(8, 16, 2, 2)
    block.train()
    first, _ = block(x)
    second, _ = block(x)
    assert not torch.equal(first, second)
    block.eval()
    first, _ = block(x)
    second, _ = block(x)
    assert torch.equal(first, second)


def test_patches_round_trip_row_major():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = to_patches(image, 2)
    assert patches[:, 0].tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    assert torch.equal(from_patches(patches, 2), image)


# -- the method -----------------------------------------------------------------------------------


def test_tiny_preset_training_steps_alternate_optimizers_and_losses_are_finite():
    torch.manual_seed(0)
    method = Squid.build("tiny")
    optimizers = method.configure_optimizers("train")
    assert set(optimizers) == {"main", "discriminator"}
    main_params = {id(p) for g in optimizers["main"].param_groups for p in g["params"]}
    assert not main_params & {id(p) for p in method.discriminator.parameters()}
    assert [s.name for s in method.stages()] == ["train"]

    method.train()
    batch = {"image": _images(size=64)}
    pointer = int(method.inpainting.memory.pointer)
    for iteration in range(4):
        losses = _step(method, optimizers, batch)
        assert ("loss" in losses) == (iteration % 2 == 0)  # generators every second iteration (§4.1.5)
        assert "loss_discriminator" in losses
        assert all(torch.isfinite(v).all() for v in losses.values())
        if "loss" in losses:
            assert {"mse_student", "mse_teacher", "distillation", "gen_adversarial"} <= set(losses)
        # One copy of the batch's features per generator step (§3.2.3; the authors' code writes after the
        # generator's optimizer step only): 4 images on iterations 0 and 2, none on 1 and 3.
        if iteration % 2 == 0:
            pointer = (pointer + 4) % method.config.memory_size
        assert int(method.inpainting.memory.pointer) == pointer


def test_teacher_gradient_stops_at_the_encoder():
    for stop_gradient, reaches in ((True, False), (False, True)):
        method = _micro(stop_gradient=stop_gradient)
        method.train()
        image = _images(2)
        out = method.generate(image, with_teacher=True)
        torch.nn.functional.mse_loss(out["teacher_reconstruction"], image).backward()
        grads = [p.grad for p in method.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches


def test_score_shapes_and_memory_frozen_at_test_time():
    method = _micro()
    optimizers = method.configure_optimizers("train")
    method.train()
    for _ in range(2):
        _step(method, optimizers, {"image": _images()})
    method.fit_reference([{"image": _images(seed=2)}, {"image": _images(seed=3)}])
    assert float(method.score_std) > 0

    queue = {k: v.clone() for k, v in method.inpainting.memory.state_dict().items()}
    method.eval()
    scores = method.score({"image": _images(3, seed=4)})
    assert scores.sample.shape == (3,)
    assert scores.map.shape == (3, 1, 32, 32)
    assert torch.isfinite(scores.sample).all() and ((scores.sample > 0) & (scores.sample < 1)).all()
    for key, value in method.inpainting.memory.state_dict().items():
        assert torch.equal(value, queue[key]), key
    # An image's score does not depend on the rest of its batch. (Barely trained, D gives all images
    # about the same logit, so sigma is tiny and would magnify float noise: compare with sigma = 1.)
    method.score_std.fill_(1.0)
    scores = method.score({"image": _images(3, seed=4)})
    again = method.score({"image": _images(3, seed=4)[:2]})
    assert torch.allclose(again.sample, scores.sample[:2], atol=1e-6)
    assert torch.allclose(again.map, scores.map[:2], atol=1e-6)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 32, 32\)"):
        method.score({"image": torch.zeros(1, 1, 64, 64)})


def test_state_dict_round_trip_gives_identical_scores():
    method = _micro()
    optimizers = method.configure_optimizers("train")
    method.train()
    for _ in range(2):
        _step(method, optimizers, {"image": _images()})
    method.fit_reference([{"image": _images(seed=2)}])
    method.eval()
    state = method.state_dict()
    assert {"score_mean", "score_std", "inpainting.memory.items", "inpainting.memory.pointer"} <= set(state)
    assert "iteration" not in state

    buffer = io.BytesIO()
    torch.save(method.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = AnomalyMethod.from_checkpoint(torch.load(buffer, weights_only=True))
    batch = {"image": _images(3, seed=5)}
    expected, got = method.score(batch), restored.score(batch)
    assert torch.equal(expected.sample, got.sample)
    assert torch.equal(expected.map, got.map)


ABLATIONS = [
    {"memory": "none"},
    {"memory": "matrix"},
    {"space_aware": False},
    {"inpainting": False},
    {"inpainting_level": "pixel"},
    {"aggregator": "conv"},
    {"shortcut": "soft"},
    {"shortcut": "none"},
    {"shrinkage": "hard"},
    {"shrinkage": "none"},
    {"teacher": False},
    {"stop_gradient": False},
    {"skip_connections": False},
    {"hierarchical_memory": False},
    {"grid": 1},
    {"grid": 4},
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_builds_trains_and_scores(overrides):
    method = _micro(**overrides)
    method.train()
    losses = _step(method, method.configure_optimizers("train"), {"image": _images(2)})
    assert {"loss", "loss_discriminator"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert ("mse_teacher" in losses) == overrides.get("teacher", True)
    method.eval()
    scores = method.score({"image": _images(2)})
    assert scores.sample.shape == (2,) and torch.isfinite(scores.sample).all()


# -- issue 9: validation without side effects, no collapse ------------------------------------------


def test_eval_mode_training_step_changes_nothing_and_always_gives_the_generator_loss():
    method = _micro()
    optimizers = method.configure_optimizers("train")
    method.train()
    for _ in range(3):  # a filled queue, an odd iteration count: the next training step is D-only
        _step(method, optimizers, {"image": _images(seed=7)})
    assert int(method.iteration) % 2 == 1
    before = {k: v.clone() for k, v in method.state_dict().items()}
    iteration, rng = int(method.iteration), torch.get_rng_state()

    method.eval()
    with torch.no_grad():
        first = method.training_step({"image": _images(seed=8)}, "train")
        second = method.training_step({"image": _images(seed=8)}, "train")
    assert {"loss", "loss_discriminator", "mse_student", "mse_teacher"} <= set(first)  # val_loss every call
    assert all(torch.equal(first[k], second[k]) for k in first)  # no masked shortcut, no random state
    after = method.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # parameters, BN statistics, queue items and pointer
    assert int(method.iteration) == iteration
    assert torch.equal(torch.get_rng_state(), rng)

    method.train()  # back in training the counter and the queue move again, on generator steps only
    pointer = int(method.inpainting.memory.pointer)
    _step(method, optimizers, {"image": _images(seed=9)})  # D-only iteration: no write
    assert int(method.inpainting.memory.pointer) == pointer
    _step(method, optimizers, {"image": _images(seed=9)})  # generator iteration: one write of 4 images
    assert int(method.inpainting.memory.pointer) == (pointer + 4) % method.config.memory_size
    assert int(method.iteration) == iteration + 2


def test_the_student_never_receives_the_raw_bottleneck():
    # Eq. 3.4: at inference the deepest generator level sees the in-painted features only; the skips come
    # from the next-finer encoder levels (the authors' up blocks).
    method = _micro()
    method.eval()
    seen = {}

    def keep(name, value):
        seen[name] = value  # returns None: the hook must not replace the module's output

    method.student.blocks[0].register_forward_hook(lambda m, i, o: keep("deepest", i[0]))
    method.inpainting.register_forward_hook(lambda m, i, o: keep("inpainted", o[0]))
    method.student.blocks[1].register_forward_hook(lambda m, i, o: keep("next", i[0]))
    method.encoder.register_forward_hook(lambda m, i, o: keep("skips", o))
    with torch.no_grad():
        method.generate(_images(2))
    assert torch.equal(seen["deepest"], seen["inpainted"])
    c = method.config.channels
    assert seen["next"].shape[1] == 2 * c[-2]  # upsampled level + the encoder's next-finer level
    assert torch.equal(seen["next"][:, c[-2]:], seen["skips"][-2])


def test_cosine_schedule_decays_each_learning_rate_five_fold():
    method = Squid.build("tiny", epochs=4)
    optimizers = method.configure_optimizers("train")
    schedulers = method.configure_schedulers("train", optimizers)
    for _ in range(4):
        for optimizer in optimizers.values():
            optimizer.step()
        for scheduler in schedulers.values():
            scheduler.step()
    # §4.1.5: 1e-4 -> 2e-5; the tiny preset's 1e-3 -> 2e-4 (not to the thesis' absolute 2e-5).
    for name, optimizer in optimizers.items():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 1e-3), name


def test_score_option_reconstruction_or_discriminator():
    method = _micro()
    method.fit_reference([{"image": _images(seed=2)}])
    method.eval()
    batch = {"image": _images(3, seed=4)}
    default = method.score(batch)
    assert method.config.score == "reconstruction"
    assert torch.allclose(default.sample, default.map.flatten(1).mean(dim=1))
    method.config.score = "discriminator"
    eq35 = method.score(batch)
    assert torch.equal(eq35.map, default.map)  # the map is the student's error either way
    assert ((eq35.sample > 0) & (eq35.sample < 1)).all() and not torch.allclose(eq35.sample, default.sample)
    with pytest.raises(ValueError, match="unknown score 'ssim'; known: reconstruction, discriminator, region"):
        Squid.make_config("tiny", {"score": "ssim"})
    with pytest.raises(ValueError, match="unknown addressing 'l2'; known: cosine, dot"):
        Squid.make_config("tiny", {"addressing": "l2"})


def test_digitanatomy_preset_is_the_authors_grid():
    c = Squid.make_config("digitanatomy")
    assert (c.image_size, c.grid, len(c.channels)) == (96, 3, 3)  # configs/digit_best.py (notes, appendix A)
    method = Squid(c)
    assert method.score({"image": torch.rand(1, 1, 96, 96)}).map.shape == (1, 1, 96, 96)
    # The CPU-budget variant: the same network without the student's learnable memories and skips
    # (Table 4.4's ablations), scored per region; nothing else differs.
    cpu = Squid.make_config("digitanatomy-cpu")
    assert (cpu.hierarchical_memory, cpu.skip_connections, cpu.score) == (False, False, "region")
    differ = {k for k in vars(c) if getattr(c, k) != getattr(cpu, k)}
    assert differ == {"hierarchical_memory", "skip_connections", "score"}, differ


def test_region_score_is_the_largest_standardised_region_error():
    method = _micro(grid=2)
    train = _images(6, seed=2)
    method.fit_reference([{"image": train[:3]}, {"image": train[3:]}])
    method.eval()
    with torch.no_grad():
        errors = (method.generate(train)["reconstruction"] - train) ** 2
    # Row-major 2 x 2 regions of the 32 x 32 image, fitted on the training images.
    regions = torch.stack([errors[:, 0, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16].mean(dim=(1, 2))
                           for r in range(2) for c in range(2)], dim=1)
    assert torch.allclose(method.region_mean, regions.mean(dim=0), atol=1e-6)
    assert torch.allclose(method.region_std, regions.std(dim=0, unbiased=False), atol=1e-6)
    test = _images(5, seed=7)
    test[0, 0, :16, 16:] = 1.0  # one region far from anything seen
    method.config.score = "region"
    region = method.score({"image": test})
    with torch.no_grad():
        errors = (method.generate(test)["reconstruction"] - test) ** 2
    per_region = torch.stack([errors[:, 0, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16].mean(dim=(1, 2))
                              for r in range(2) for c in range(2)], dim=1)
    expected = ((per_region - method.region_mean) / method.region_std).max(dim=1).values
    assert torch.allclose(region.sample, expected, atol=1e-5)
    assert int(region.sample.argmax()) == 0
    method.config.score = "reconstruction"
    assert torch.equal(method.score({"image": test}).map, region.map)


def _varied_images(n: int, seed: int) -> torch.Tensor:
    """A bright bar of random position, length and orientation per image, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 32, 32, generator=g) * 0.05
    for image in images:
        a, b = (int(v) for v in torch.randint(2, 30, (2,), generator=g))
        lo, hi = min(a, b), max(a, b) + 2
        row = int(torch.randint(4, 28, (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:
            image[0, row - 3 : row + 3, lo:hi] = 0.9
        else:
            image[0, lo:hi, row - 3 : row + 3] = 0.9
    return images


# Larger than MICRO (one more level of channels): big enough for the dot product's collapse to show.
COLLAPSE = {
    "image_size": 32, "grid": 2, "channels": (8, 16, 32), "discriminator_channels": (8, 8, 16, 16, 16),
    "memory_size": 16, "memory_matrix_size": 16, "inpaint_heads": 4, "lr": 2e-3, "lr_discriminator": 2e-3,
}


def _train_and_probe(addressing: str) -> tuple[float, float, list[int]]:
    """(inputs' std across test images, reconstructions' std, items used per student-memory region)."""
    torch.manual_seed(0)
    method = Squid.build("tiny", **{**COLLAPSE, "addressing": addressing})
    optimizers = method.configure_optimizers("train")
    train = _varied_images(64, seed=0)
    method.train()
    for step in range(40):
        index = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(step))
        _step(method, optimizers, {"image": train[index]})
    test = _varied_images(16, seed=1)
    method.eval()
    used: list[int] = []

    def count(module, inputs, output):
        weights = gumbel_shrinkage(similarities(inputs[0], module.items, module.addressing, module.temperature), module.top_k)
        # An item is used in a region if it carries at least 10% of the read for some test image.
        used.extend(int((weights[:, r] > 0.1).any(dim=0).sum()) for r in range(weights.shape[1]))

    for memory in method.student.memories:
        memory.register_forward_hook(count)
    with torch.no_grad():
        reconstruction = method.generate(test)["reconstruction"]
    return float(test.std(dim=0).mean()), float(reconstruction.std(dim=0).mean()), used


def test_student_does_not_collapse_to_one_image():
    # Issue 9: with the thesis' dot product (addressing="dot") one memory item won every query and the
    # student drew the same image whatever the input: on this run the reconstructions' spread is ~0.0003
    # for inputs' 0.17, and some regions read a single item. With the default addressing, reconstructions
    # of different images differ (measured ~0.028, and far more with longer training), and every region
    # of the student's memories reads several items.
    input_std, reconstruction_std, used = _train_and_probe("cosine")
    assert reconstruction_std > 0.1 * input_std, (reconstruction_std, input_std)
    assert min(used) > 1, used
