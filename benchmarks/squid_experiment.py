"""SQUID vs the autoencoder on DigitAnatomy, in memory, one CPU thread (issue 9's SQUID measurements).

Pure PyTorch, no Ray, no files: normal training images and a class-balanced test set (half normal, the
other half split evenly over the four anomaly types) are drawn with the platform's DigitAnatomy helpers
(``medood.platform.data.synthetic``), each method trains with the platform's step rule (each loss into
its own optimizer, schedulers stepped per epoch), SQUID's Eq. 3.5 statistics are fitted on the training
images, and test AUROC (sklearn) is printed per run and seed, overall and per anomaly type, for all of
SQUID's scores (reconstruction, region, eq. 3.5). Runs (``--runs``):

- ``squid``: the ``digitanatomy`` preset (3 x 3 grid, 96 px);
- ``squid-grid1``: the same with a 1 x 1 grid (the thesis' "space-aware settings not triggered");
- ``squid-dot``: the same with the thesis' dot-product addressing (the collapse of issue 9);
- ``squid-cpu`` / ``squid-cpu-grid1``: the ``digitanatomy-cpu`` preset (no learnable student memories, no
  skips, per-region score; see its comment in squid.py) with a 3 x 3 / 1 x 1 grid;
- ``autoencoder``: the autoencoder's ``tiny`` preset at the same image size;
- ``floor``: the pixel Mahalanobis reference floor (training-free, fitted on the same training images).

Every seed is a data seed and a training seed. ``--fresh`` draws new normal training images every epoch
(the thesis' on-the-fly DigitAnatomy loader, notes §8.1; the authors' code draws 1,600 per epoch), the
same images for every run of a seed. Each run also prints diagnostics: the reconstruction error inside
the anomalous cells (where the test mask is) against the other cells and against normal images, how close
the reconstruction of an anomalous cell is to the input and to the normal image it was made from (does the
student in-paint a normal digit or copy the anomaly?), and for SQUID which path carries the anomaly (the
in-painted bottleneck or the skip connections), by swapping the two between an abnormal image and its
normal counterpart.

Results go to ``--out`` (one JSON line per run and seed, appended, so seeds can run in separate
processes); ``--summary FILE ...`` prints the table of every JSON line read: AUROC per seed, mean with its
95% t-interval, and the paired differences (squid - autoencoder, eq. 3.5 - autoencoder, grid 3 - grid 1,
squid - floor) with their t-intervals, only over seeds both runs have.

    OMP_NUM_THREADS=1 python benchmarks/squid_experiment.py --runs squid autoencoder --seeds 0 1 2 --out r.jsonl
    python benchmarks/squid_experiment.py --summary r.jsonl --summary-json summary.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from accuracy import t_interval  # one t-interval for every benchmark

from medood.methods import get
from medood.methods.base import AnomalyMethod
from medood.platform.data.synthetic import DIGIT_ANOMALIES, digit_anatomy, digit_pools
from medood.platform.train import step_optimizers

RUNS = {
    "squid": ("squid", "digitanatomy", {}),
    "squid-grid1": ("squid", "digitanatomy", {"grid": 1}),
    "squid-dot": ("squid", "digitanatomy", {"addressing": "dot"}),
    "squid-cpu": ("squid", "digitanatomy-cpu", {}),
    "squid-cpu-grid1": ("squid", "digitanatomy-cpu", {"grid": 1}),
    "autoencoder": ("autoencoder", "tiny", {}),
    "floor": ("pixel_mahalanobis", "paper", {}),
}
# (label, run, score) - (label, run, score): the paired differences the summary prints.
AE, FLOOR = ("autoencoder", "reconstruction"), ("floor", "reconstruction")
PAIRS = (
    *(
        pair
        for run, default in (("squid-cpu", "region"), ("squid", "reconstruction"))
        for pair in (
            (f"{run} ({default}) - autoencoder", (run, default), AE),
            *(
                (f"{run} ({score}) - autoencoder", (run, score), AE)
                for score in ("reconstruction", "region", "discriminator") if score != default
            ),
            *(
                (f"{run} grid 3 - grid 1 ({score})", (run, score), (f"{run}-grid1", score))
                for score in dict.fromkeys((default, "reconstruction", "discriminator"))
            ),
            (f"{run} ({default}) - floor", (run, default), FLOOR),
        )
    ),
    ("autoencoder - floor", AE, FLOOR),
    ("squid-cpu (region) - autoencoder cell-max", ("squid-cpu", "region"), ("autoencoder", "cell-max diagnostic")),
)


def make_data(seed: int, n_train: int, n_test: int, size: int) -> dict[str, np.ndarray]:
    """Normal training images; test images half normal, half abnormal (types in equal shares), their masks
    and, for each test image, the normal image it was made from (itself if normal)."""
    train_pool, test_pool = digit_pools()
    rng = np.random.default_rng([seed, 0])
    train = np.stack([digit_anatomy(size, train_pool, rng)[0] for _ in range(n_train)])
    kinds = ["normal"] * (n_test // 2) + [DIGIT_ANOMALIES[i % len(DIGIT_ANOMALIES)] for i in range(n_test - n_test // 2)]
    rng = np.random.default_rng([seed, 1])
    test, masks, normals = [], [], []
    for kind in kinds:
        # digit_anatomy draws the normal cells first, so the same generator state gives the normal original.
        normals.append(digit_anatomy(size, test_pool, copy.deepcopy(rng))[0])
        image, mask = digit_anatomy(size, test_pool, rng, kind)
        test.append(image)
        masks.append(mask)
    return {
        "train": train[:, None], "test": np.stack(test)[:, None], "kind": np.array(kinds),
        "mask": np.stack(masks), "normal": np.stack(normals)[:, None],
    }


def fresh_epochs(seed: int, n_train: int, size: int) -> Callable[[int], torch.Tensor]:
    """Epoch e's normal training images, new every epoch (on the fly, notes §8.1); epoch 0 = make_data's."""
    train_pool, _ = digit_pools()
    cache: dict[int, torch.Tensor] = {}

    def images(epoch: int) -> torch.Tensor:
        if epoch not in cache:
            rng = np.random.default_rng([seed, 0] if epoch == 0 else [seed, 2, epoch])
            cache[epoch] = torch.from_numpy(np.stack([digit_anatomy(size, train_pool, rng)[0] for _ in range(n_train)])[:, None])
        return cache[epoch]

    return images


def train(method: AnomalyMethod, epoch_images: Callable[[int], torch.Tensor], seed: int) -> float:
    """The platform's loop in miniature: shuffled batches, each loss stepping its own optimizer."""
    torch.manual_seed(seed)
    batch_size = method.config.batch_size
    loss = float("nan")
    for stage in method.stages():
        optimizers = method.configure_optimizers(stage.name)
        schedulers = method.configure_schedulers(stage.name, optimizers)
        for epoch in range(stage.epochs):
            images = epoch_images(epoch)
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


def auroc_figures(labels: np.ndarray, kinds: np.ndarray, values: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    per_type = {}
    for kind in DIGIT_ANOMALIES:
        keep = (kinds == kind) | (labels == 0)
        per_type[kind] = round(float(roc_auc_score(labels[keep], values[keep])), 3)
    return {"auroc": round(float(roc_auc_score(labels, values)), 3), "per_type": per_type}


def evaluate(method: AnomalyMethod, data: dict[str, np.ndarray], train_images: torch.Tensor) -> dict:
    test = torch.from_numpy(data["test"])
    labels = (data["kind"] != "normal").astype(int)
    method.eval()
    scores_by = {}
    if method.name == "squid":
        method.fit_reference(batches(train_images))
        for score in ("reconstruction", "region", "discriminator"):
            method.config.score = score
            scores_by[score] = torch.cat([method.score(b).sample for b in batches(test)]).numpy()
    else:
        if not method.trainable:
            method.fit_reference(batches(train_images))
        scores_by["reconstruction"] = torch.cat([method.score(b).sample for b in batches(test)]).numpy()
    result = {score: auroc_figures(labels, data["kind"], values) for score, values in scores_by.items()}
    if method.trainable:
        result["collapse"] = collapse_figures(method, test[labels == 0][:100])
        result["cells"] = cell_figures(method, data, train_images)
    return result


def reconstruct(method: AnomalyMethod, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if method.name == "squid":
            return torch.cat([method.generate(b["image"])["reconstruction"] for b in batches(images)])
        return torch.cat([method.reconstruct(b["image"]) for b in batches(images)])


def cell_errors(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) twice -> (N, 9): mean squared difference per cell of the 3 x 3 digit grid."""
    size = a.shape[-1]
    cell, offset = size // 3, (size - 3 * (size // 3)) // 2
    d = ((a - b) ** 2)[:, 0, offset : offset + 3 * cell, offset : offset + 3 * cell]
    return d.reshape(-1, 3, cell, 3, cell).mean(dim=(2, 4)).reshape(-1, 9).numpy()


def anomalous_cells(mask: np.ndarray) -> np.ndarray:
    """(N, S, S) masks -> (N, 9) bool: the cells the anomaly changed."""
    size = mask.shape[-1]
    cell, offset = size // 3, (size - 3 * (size // 3)) // 2
    m = mask[:, offset : offset + 3 * cell, offset : offset + 3 * cell].reshape(-1, 3, cell, 3, cell)
    return m.sum(axis=(2, 4)).reshape(-1, 9) > 0


@torch.no_grad()
def cell_figures(method: AnomalyMethod, data: dict[str, np.ndarray], train_images: torch.Tensor) -> dict:
    """Where the reconstruction error is, per anomaly type (means over images of per-cell MSE x 1e3):

    - ``anomalous``: error in the cells the anomaly changed; ``other``: the unchanged cells of the same
      abnormal images; ``normal``: every cell of the normal test images;
    - ``to_original``: in the anomalous cells, the reconstruction's distance to the normal image the
      abnormal one was made from (low = the anomaly was in-painted away; high together with a low
      ``anomalous`` = the anomaly was copied);
    - ``cell_max_auroc``: AUROC of the largest per-cell error standardised by the training images' per-cell
      mean and spread (a diagnostic of how much the whole-image mean dilutes a one-cell anomaly);
    - for SQUID, ``swap``: the anomalous cells' error against the abnormal input when the skip connections
      come from the normal original (``skips_normal``) or the in-painted bottleneck does (``bottleneck_normal``).
    """
    test, original = torch.from_numpy(data["test"]), torch.from_numpy(data["normal"])
    kinds, labels = data["kind"], (data["kind"] != "normal").astype(int)
    cells = anomalous_cells(data["mask"])
    recon = reconstruct(method, test)
    err = cell_errors(recon, test)
    to_original = cell_errors(recon, original)
    train_err = cell_errors(reconstruct(method, train_images), train_images)
    z = (err - train_err.mean(axis=0)) / train_err.std(axis=0).clip(1e-8)
    swap = swap_figures(method, test, original) if method.name == "squid" else None
    figures: dict = {"normal": round(float(err[labels == 0].mean() * 1e3), 3)}
    for kind in DIGIT_ANOMALIES:
        pick = kinds == kind
        own = cells[pick]
        entry = {
            "anomalous": float(err[pick][own].mean() * 1e3),
            "other": float(err[pick][~own].mean() * 1e3),
            "to_original": float(to_original[pick][own].mean() * 1e3),
        }
        if swap is not None:
            for name, values in swap.items():
                entry[name] = float(values[pick][own].mean() * 1e3)
        figures[kind] = {key: round(value, 3) for key, value in entry.items()}
    figures["cell_max_auroc"] = auroc_figures(labels, kinds, z.max(axis=1))
    return figures


@torch.no_grad()
def swap_figures(method: AnomalyMethod, test: torch.Tensor, original: torch.Tensor) -> dict[str, np.ndarray]:
    """SQUID's student with the skips of one image and the in-painted bottleneck of the other."""
    from medood.methods.squid import to_patches

    grid = method.config.grid
    out = {"skips_normal": [], "bottleneck_normal": []}
    for start in range(0, len(test), 50):
        abnormal, normal = test[start : start + 50], original[start : start + 50]
        skips_a, skips_n = method.encoder(to_patches(abnormal, grid)), method.encoder(to_patches(normal, grid))
        inpaint = (lambda f: method.inpainting(f)[0]) if method.inpainting is not None else (lambda f: f)
        out["skips_normal"].append(method.student(inpaint(skips_a[-1]), skips_n)[0])
        out["bottleneck_normal"].append(method.student(inpaint(skips_n[-1]), skips_a)[0])
    return {name: cell_errors(torch.cat(values), test) for name, values in out.items()}


@torch.no_grad()
def collapse_figures(method: AnomalyMethod, images: torch.Tensor) -> dict:
    """Spread across images of the reconstruction vs of the input; memory items used per region."""
    reconstruction = reconstruct(method, images)
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


# -- summary ------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict:
    """AUROC per (tag, run, score) and seed; paired differences within each tag."""
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        tag = row.get("tag", "")
        # The diagnostic per-cell score (cell_figures) of runs without a "region" score: the autoencoder's.
        found = {score: row[score] for score in ("reconstruction", "region", "discriminator") if score in row}
        if "region" not in found and "cells" in row:
            found["cell-max diagnostic"] = row["cells"]["cell_max_auroc"]
        for score, figures in found.items():
            key = f"{row['run']}|{score}"
            entry = table.setdefault(tag, {}).setdefault(key, {"seeds": {}, "per_type": {}})
            entry["seeds"][row["seed"]] = figures["auroc"]
            entry["per_type"][row["seed"]] = figures["per_type"]
    out: dict = {}
    for tag, runs in table.items():
        block: dict = {"runs": {}, "pairs": {}}
        for key, entry in runs.items():
            mean, low, high = t_interval(list(entry["seeds"].values()))
            per_type = {k: round(float(np.mean([p[k] for p in entry["per_type"].values()])), 3) for k in DIGIT_ANOMALIES}
            block["runs"][key] = {"seeds": entry["seeds"], "mean": mean, "ci": [low, high], "per_type": per_type}
        for label, a, b in PAIRS:
            ka, kb = f"{a[0]}|{a[1]}", f"{b[0]}|{b[1]}"
            if ka in runs and kb in runs:
                seeds = sorted(set(runs[ka]["seeds"]) & set(runs[kb]["seeds"]))
                diffs = {s: runs[ka]["seeds"][s] - runs[kb]["seeds"][s] for s in seeds}
                mean, low, high = t_interval(list(diffs.values()))
                block["pairs"][label] = {"seeds": diffs, "mean": mean, "ci": [low, high], "met": bool(len(seeds) >= 3 and low > 0)}
        out[tag or "default"] = block
    return out


def print_summary(summary: dict) -> None:
    for tag, block in summary.items():
        print(f"\n## {tag}")
        print(f"{'run | score':40s} {'seeds (AUROC)':44s} {'mean':>6s}  95% t-interval   per type (mean)")
        for key, e in block["runs"].items():
            seeds = " ".join(f"{s}:{v:.3f}" for s, v in sorted(e["seeds"].items()))
            types = " ".join(f"{k} {v:.2f}" for k, v in e["per_type"].items())
            print(f"{key:40s} {seeds:44s} {e['mean']:6.3f}  ({e['ci'][0]:+.3f}, {e['ci'][1]:+.3f})  {types}")
        for label, e in block["pairs"].items():
            seeds = " ".join(f"{s}:{v:+.3f}" for s, v in sorted(e["seeds"].items()))
            print(f"{label:40s} {seeds:44s} {e['mean']:+6.3f}  ({e['ci'][0]:+.3f}, {e['ci'][1]:+.3f})  "
                  f"{'MET' if e['met'] else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["squid-cpu", "squid-cpu-grid1", "autoencoder", "floor"], choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--fresh", action="store_true", help="new normal training images every epoch (on the fly)")
    parser.add_argument("--set", nargs="*", default=[], help="extra SQUID overrides key=value")
    parser.add_argument("--tag", default="", help="names this budget/setting in the JSON and the summary")
    parser.add_argument("--out", default=None, help="append one JSON line per run and seed to this file")
    parser.add_argument("--summary", nargs="+", default=None, help="summarise these JSON-lines files and exit")
    parser.add_argument("--summary-json", default=None, help="write the summary as JSON here")
    args = parser.parse_args()
    if args.summary:
        rows = [json.loads(line) for path in args.summary for line in open(path) if line.strip().startswith("{")]
        summary = summarise(rows)
        print_summary(summary)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=1)
        return
    torch.set_num_threads(1)
    extra = dict(item.split("=", 1) for item in args.set)

    for seed in args.seeds:
        data = make_data(seed, args.n_train, args.n_test, args.size)
        train_images = torch.from_numpy(data["train"])
        epoch_images = fresh_epochs(seed, args.n_train, args.size) if args.fresh else (lambda epoch, images=train_images: images)
        for run in args.runs:
            name, preset, overrides = RUNS[run]
            overrides = {**overrides, "image_size": args.size, "seed": seed}
            if name == "squid":
                overrides.update(extra)
            torch.manual_seed(seed)
            method = get(name).build(preset, **overrides)
            if args.epochs is not None and method.trainable:
                method = get(name).build(preset, **overrides, epochs=args.epochs)
            t0 = time.perf_counter()
            loss = train(method, epoch_images, seed) if method.trainable else float("nan")
            epochs = method.stages()[0].epochs if method.trainable else 0
            result = {"run": run, "tag": args.tag, "seed": seed, "epochs": epochs, "n_train": args.n_train,
                      "n_test": args.n_test, "fresh": args.fresh, "set": extra if name == "squid" else {},
                      "final_loss": round(loss, 5), "train_s": round(time.perf_counter() - t0, 1),
                      **evaluate(method, data, train_images)}
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
