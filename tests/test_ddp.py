"""Gradient synchronisation of multi-worker training through DDP (issue 15, item 4).

Two gloo processes with B images each end one ``step_optimizers`` step with the same parameters as one
process with the 2B images, for the autoencoder (one optimizer) and for SQUID, whose generator loss runs
through the discriminator while only the generator's optimizer minimises it and the discriminator's
optimizer minimises its own loss (two backward passes into disjoint parameters per forward). The
ranks build their models from different seeds: ``broadcast_state`` starts them from rank 0's weights.

Batch norm layers run on their running statistics here (eval mode) so that a batch of 2B is the same
computation as two of B; with batch statistics that needs ``sync_batchnorm`` (GPU only).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from medood import methods
from medood.platform.train import broadcast_state, prepare_optimizers, step_optimizers

B = 3
SMALL = {
    "autoencoder": {"image_size": 32, "batch_size": B},
    # Deterministic per sample: no Gumbel noise in the memory read, no random shortcut masks (in-painting
    # block and student memories): two processes draw per-sample noise differently from one.
    "squid": {
        "image_size": 32, "batch_size": B, "channels": (4, 8), "discriminator_channels": (4, 8, 8, 8, 8),
        "shrinkage": "none", "shortcut": "none", "hierarchical_memory": False,
    },
}


def _model(name: str, seed: int):
    torch.manual_seed(seed)
    model = methods.get(name).build("tiny", **SMALL[name])
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()  # running statistics: per-sample computation (see the module doc)
    return model


def _batch(name: str, rows: slice) -> dict:
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2 * B, 1, 32, 32, generator=g)[rows]
    n = len(image)
    return {"image": image, "label": torch.zeros(n, dtype=torch.long), "id": [f"c{i}" for i in range(n)]}


def _step(model, batch, syncs=None) -> dict[str, torch.Tensor]:
    optimizers = model.configure_optimizers("train")
    if syncs is not None:
        syncs = prepare_optimizers(optimizers, world_size=2, wrap=lambda m: DistributedDataParallel(m, find_unused_parameters=True))
    torch.manual_seed(11)
    losses = model(batch, "train")
    assert len(optimizers) == (2 if "loss_discriminator" in losses else 1)
    step_optimizers(optimizers, losses, syncs=syncs)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _worker(rank: int, name: str, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = _model(name, seed=rank)  # different weights per rank until the broadcast
        broadcast_state(model, 2)
        out[rank] = _step(model, _batch(name, slice(rank * B, (rank + 1) * B)), syncs={})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["autoencoder", "squid"])
def test_two_workers_with_b_each_step_like_one_worker_with_2b(name):
    torch.set_num_threads(1)
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(name, free_port(), out), nprocs=2, join=True, start_method="fork")
    start = {k: v.detach().clone() for k, v in _model(name, seed=0).named_parameters()}
    expected = _step(_model(name, seed=0), _batch(name, slice(0, 2 * B)))
    for rank in (0, 1):
        assert out[rank].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(out[rank][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
    # The step moved both sub-networks (a test that cannot fail otherwise).
    moved = [k for k in expected if not torch.equal(expected[k], start[k])]
    assert any(not k.startswith("discriminator.") for k in moved)
    if name == "squid":
        assert any(k.startswith("discriminator.") for k in moved)
