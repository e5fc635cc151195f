"""The method contract's stage hooks across Train workers: every rank ends a stage start with the same
k-means centres (fitted on the features of all ranks), and pruning acts on counts summed over ranks.

The test here runs the platform helpers in two gloo processes (no Ray); the Ray Train run of ``self_taught``
with two CPU workers on known-anomaly shards is in test_train_evaluate.py (that module's local Ray).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from medood import methods
from medood.methods.self_taught import kmeans_centers, snap_centers
from medood.platform.train import begin_stage, end_epoch

SMALL = {
    "image_size": 32, "widths": (8, 8, 16, 16), "head": (16, 8), "n_spheres": 3, "gamma": 0.3,
    "pretext_epochs": 1, "ad_epochs": 1, "batch_size": 8,
}


def _model():
    torch.manual_seed(0)  # same initial weights on every rank
    return methods.get("self_taught").build("tiny", **SMALL)


def _images(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(n, 1, 32, 32, generator=g)


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        n = 5 + 3 * rank  # different row counts per rank
        images = _images(rank, n)
        labels = torch.zeros(n, dtype=torch.int64)
        labels[0] = 1  # a known anomaly: left out of k-means
        batches = [{"image": images, "label": labels, "id": [f"r{rank}c{i}" for i in range(n)]}]
        begin_stage(model, "ad", iter(batches), world_size=world)
        # Rank 0 saw sphere 0 often, rank 1 sphere 1; sphere 2 is small only in the sum over ranks.
        model._counts = torch.tensor([10, 0, 1]) if rank == 0 else torch.tensor([0, 10, 1])
        end_epoch(model, "ad", 0, world_size=world)
        out[rank] = {"centers": model.centers.clone(), "active": model.active.clone()}
    finally:
        dist.destroy_process_group()


def test_two_workers_get_identical_centres_from_all_data_and_prune_on_summed_counts():
    manager = mp.Manager()
    out = manager.dict()
    # fork: the children inherit the imports (spawn would import torch twice more).
    mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="fork")
    torch.testing.assert_close(out[0]["centers"], out[1]["centers"], rtol=0, atol=0)

    # The same centres as one process fitting on both ranks' non-abnormal images.
    model = _model()
    model.eval()
    with torch.no_grad():
        features = torch.cat([model.encoder(_images(rank, 5 + 3 * rank)[1:]) for rank in (0, 1)])
        expected = snap_centers(torch.from_numpy(kmeans_centers(model.ad_head(features).numpy(), 3, 0)).float(), 0.1)
    torch.testing.assert_close(out[0]["centers"], expected, rtol=1e-5, atol=1e-5)
    # Summed counts [10, 10, 2]: sphere 2 holds 2 < 0.3 * 10 and is pruned on both ranks; per rank,
    # rank 0 alone would have pruned sphere 1 (0 < 3) and rank 1 sphere 0.
    assert out[0]["active"].tolist() == out[1]["active"].tolist() == [True, True, False]
