"""Epoch time of the autoencoder under TorchTrainer (1 worker, streamed shards) vs a plain PyTorch loop.

Both train the same `tiny` autoencoder with the same batch size and torch threads on the same
samples; the plain loop iterates tensors decoded once up front. Epoch 1 is the warm-up; the figure
is the median of the later epochs. Prints a table and writes benchmarks/results/train_overhead.json.
Goal: TorchTrainer / plain <= 1.15.

    python benchmarks/train_overhead.py [--images 1500] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/train_overhead.json")
    args = parser.parse_args()

    from medood import methods
    from medood.platform.data.ingest import ingest
    from medood.platform.data.stream import InputSpec, read_split, to_torch_batch
    from medood.platform.data.synthetic import synthesize
    from medood.platform.jobs import ensure_ray
    from medood.platform.train import TrainOptions, step_optimizers, train

    work = Path(tempfile.mkdtemp(prefix="medood-overhead-"))
    os.environ.setdefault("MEDOOD_HOME", str(work / "home"))
    n_train = int(args.images / 0.8)
    layout = synthesize("digitanatomy", work / "raw", n_train=n_train, n_test=40, size=args.size, seed=0)
    ingest(layout, work / "raw", work / "shards", progress=False)
    ensure_ray()
    overrides = {"epochs": args.epochs, "image_size": args.size}

    result = train(
        TrainOptions(
            method="autoencoder", data=str(work / "shards"), out=str(work / "run"), preset="tiny",
            overrides=overrides, wandb=False, shuffle_buffer=64,
        )
    )
    ray_epochs = [h["epoch_time_s"] for h in result.history]
    n_samples = result.history[0]["train_samples"]

    # The plain loop: the same samples decoded once, the same model, optimizer, batch size and threads.
    cls = methods.get("autoencoder")
    config = cls.make_config("tiny", overrides)
    spec = InputSpec.from_config(config)
    rows = list(read_split(work / "shards", "train", spec).iter_batches(batch_size=256, batch_format="numpy"))
    images = torch.cat([to_torch_batch(b)["image"] for b in rows])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cls(config)
    optimizers = model.configure_optimizers("train")
    plain_epochs = []
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(images))
        t0 = time.perf_counter()
        for start in range(0, len(images), config.batch_size):
            batch = {"image": images[order[start : start + config.batch_size]], "label": None, "id": []}
            step_optimizers(optimizers, model(batch, "train"))
        plain_epochs.append(time.perf_counter() - t0)

    ray_s, plain_s = float(np.median(ray_epochs[1:])), float(np.median(plain_epochs[1:]))
    ratio = ray_s / plain_s
    print(f"\nautoencoder tiny, {n_samples} images of {args.size}x{args.size}, batch {config.batch_size}, 1 thread")
    print(f"{'loop':<36} {'epoch (s)':>10} {'images/s':>10}")
    print(f"{'TorchTrainer + streamed shards':<36} {ray_s:>10.2f} {n_samples / ray_s:>10.1f}")
    print(f"{'plain PyTorch, decoded tensors':<36} {plain_s:>10.2f} {len(images) / plain_s:>10.1f}")
    print(f"ratio {ratio:.3f} (goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    print(f"per-epoch TorchTrainer: {[round(x, 2) for x in ray_epochs]}; plain: {[round(x, 2) for x in plain_epochs]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"images": n_samples, "size": args.size, "ray_epoch_s": ray_epochs, "plain_epoch_s": plain_epochs,
             "ratio": ratio, "goal_met": ratio <= 1.15},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
