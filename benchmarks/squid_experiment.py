"""SQUID vs the autoencoder on DigitAnatomy, in memory, one CPU thread (issue 9's SQUID measurements).

Pure PyTorch, no Ray, no files: normal training images and a class-balanced test set (half normal, the
other half split evenly over the four anomaly types) are drawn with the platform's DigitAnatomy helpers
(``medood.platform.data.synthetic``), each method trains with the platform's step rule (each loss into
its own optimizer, schedulers stepped per epoch), SQUID's Eq. 3.5 statistics are fitted on the training
images, and test AUROC (sklearn) is printed per run and seed, overall and per anomaly type, for both of
SQUID's scores. Runs (``--runs``):

- ``squid``: the ``digitanatomy`` preset (3 x 3 grid, 96 px);
- ``squid-grid1``: the same with a 1 x 1 grid (the thesis' "space-aware settings not triggered");
- ``squid-dot``: the same with the thesis' dot-product addressing (the collapse of issue 9);
- ``autoencoder``: the autoencoder's ``tiny`` preset at the same image size.

    OMP_NUM_THREADS=1 python benchmarks/squid_experiment.py --runs squid autoencoder --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from medood.methods import get
from medood.methods.base import AnomalyMethod
from medood.platform.data.synthetic import DIGIT_ANOMALIES, digit_anatomy, digit_pools
from medood.platform.train import step_optimizers

RUNS = {
    "squid": ("squid", "digitanatomy", {}),
    "squid-grid1": ("squid", "digitanatomy", {"grid": 1}),
    "squid-dot": ("squid", "digitanatomy", {"addressing": "dot"}),
    "autoencoder": ("autoencoder", "tiny", {}),
}


def make_data(seed: int, n_train: int, n_test: int, size: int) -> dict[str, np.ndarray]:
    """Normal training images; test images half normal, half abnormal (types in equal shares)."""
    train_pool, test_pool = digit_pools()
    rng = np.random.default_rng([seed, 0])
    train = np.stack([digit_anatomy(size, train_pool, rng)[0] for _ in range(n_train)])
    kinds = ["normal"] * (n_test // 2) + [DIGIT_ANOMALIES[i % len(DIGIT_ANOMALIES)] for i in range(n_test - n_test // 2)]
    rng = np.random.default_rng([seed, 1])
    test = np.stack([digit_anatomy(size, test_pool, rng, kind)[0] for kind in kinds])
    return {"train": train[:, None], "test": test[:, None], "kind": np.array(kinds)}


def train(method: AnomalyMethod, images: torch.Tensor, seed: int) -> float:
    """The platform's loop in miniature: shuffled batches, each loss stepping its own optimizer."""
    torch.manual_seed(seed)
    batch_size = method.config.batch_size
    loss = float("nan")
    for stage in method.stages():
        optimizers = method.configure_optimizers(stage.name)
        schedulers = method.configure_schedulers(stage.name, optimizers)
        for _ in range(stage.epochs):
            method.train()
            order = torch.randperm(len(images))
            for start in range(0, len(images) - batch_size + 1, batch_size):
                losses = method.training_step({"image": images[order[start : start + batch_size]]}, stage.name)
                step_optimizers(optimizers, losses)
                if "loss" in losses:
                    loss = float(losses["loss"].detach())
            for scheduler in schedulers.values():
                scheduler.step()
    return loss


def batches(images: torch.Tensor, size: int = 50):
    for start in range(0, len(images), size):
        yield {"image": images[start : start + size]}


def evaluate(method: AnomalyMethod, data: dict[str, np.ndarray], train_images: torch.Tensor) -> dict:
    from sklearn.metrics import roc_auc_score

    test = torch.from_numpy(data["test"])
    labels = (data["kind"] != "normal").astype(int)
    method.eval()
    scores_by = {}
    if method.name == "squid":
        method.fit_reference(batches(train_images))
        for score in ("reconstruction", "discriminator"):
            method.config.score = score
            scores_by[score] = torch.cat([method.score(b).sample for b in batches(test)]).numpy()
    else:
        scores_by["reconstruction"] = torch.cat([method.score(b).sample for b in batches(test)]).numpy()
    result = {}
    for score, values in scores_by.items():
        per_type = {
            kind: round(float(roc_auc_score(labels[(data["kind"] == kind) | (labels == 0)],
                                            values[(data["kind"] == kind) | (labels == 0)])), 3)
            for kind in DIGIT_ANOMALIES
        }
        result[score] = {"auroc": round(float(roc_auc_score(labels, values)), 3), "per_type": per_type}
    result["collapse"] = collapse_figures(method, test[labels == 0][:100])
    return result


@torch.no_grad()
def collapse_figures(method: AnomalyMethod, images: torch.Tensor) -> dict:
    """Spread across images of the reconstruction vs of the input; memory items used per region."""
    reconstruction = method.generate(images)["reconstruction"] if method.name == "squid" else method.reconstruct(images)
    figures = {
        "input_std": round(float(images.std(dim=0).mean()), 4),
        "reconstruction_std": round(float(reconstruction.std(dim=0).mean()), 4),
    }
    if method.name == "squid":
        figures["items_used_per_region"] = items_used(method, images)
    return figures


@torch.no_grad()
def items_used(method: AnomalyMethod, images: torch.Tensor) -> dict[str, float]:
    """Distinct top-1 items over the images, averaged over regions, for every student memory matrix."""
    used: dict[str, float] = {}
    hooks = []
    for name, module in method.student.memories.named_children():

        def hook(module, inputs, output, name=name):
            from medood.methods.components.memory import similarities

            sim = similarities(inputs[0], module.items, module.addressing, module.temperature)
            top = sim.argmax(dim=-1)  # (B, R)
            used[f"student{name}"] = float(np.mean([len(torch.unique(top[:, r])) for r in range(top.shape[1])]))

        hooks.append(module.register_forward_hook(hook))
    method.generate(images)
    for h in hooks:
        h.remove()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--set", nargs="*", default=[], help="extra SQUID overrides key=value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = dict(item.split("=", 1) for item in args.set)

    for seed in args.seeds:
        data = make_data(seed, args.n_train, args.n_test, args.size)
        train_images = torch.from_numpy(data["train"])
        for run in args.runs:
            name, preset, overrides = RUNS[run]
            overrides = {**overrides, "image_size": args.size, "seed": seed}
            if name == "squid":
                overrides.update(extra)
            if args.epochs is not None:
                overrides["epochs"] = args.epochs
            torch.manual_seed(seed)
            method = get(name).build(preset, **overrides)
            t0 = time.perf_counter()
            loss = train(method, train_images, seed)
            result = {"run": run, "seed": seed, "epochs": method.stages()[0].epochs, "n_train": args.n_train,
                      "n_test": args.n_test, "final_loss": round(loss, 5),
                      "train_s": round(time.perf_counter() - t0, 1), **evaluate(method, data, train_images)}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
