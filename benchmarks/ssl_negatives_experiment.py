"""contrastive_mahalanobis and dino_negatives vs the autoencoder and the floor, in memory (issue 11).

Pure PyTorch, no Ray, one CPU thread, the platform's data generators and preprocessing:

- ``digitanatomy`` (96 px): normal training images and a test set half normal, half abnormal (the four
  anomaly types in equal shares), drawn as ``benchmarks/squid_experiment.py`` draws them.
- ``brain`` (synthetic-brain at 64, axial slices with >= 20% foreground, as ``benchmarks/accuracy.py``
  and ``benchmarks/mae_experiment.py`` prepare them): slice-level AUROC, and per anomaly type the
  volume-level AUROC (max over a volume's slices) against the normal volumes.

Each run trains with the platform's step rule (``step_optimizers``, per-epoch schedulers), fits its
reference on the normal training images (with case ids, so cosine banks exclude self-matches), and
prints one JSON line per run and seed with the AUROC overall, per anomaly type, and (where the method
has it) the label-free sensitivity score of the thesis (Sec. 6.1.5) on the normal test cases. Anomaly
types that share a transformation with a run's negatives or augmentations are listed under
``leaking`` and left out of ``auroc_clean`` (issue 11, "leaking negatives").

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/ssl_negatives_experiment.py --dataset digitanatomy \
        --runs contrastive autoencoder pixel_mahalanobis --seeds 0 1 2 --out results.jsonl
    python benchmarks/ssl_negatives_experiment.py --summary results.jsonl   # paired t-intervals

Measured (one thread on a shared 2-core CPU; seeds 0, 1, 2 = data and training seed; mean AUROC with
the 95% t-interval over seeds; differences paired by seed, on the same anomaly types):

DigitAnatomy (600 train / 400 test, 96 px), image-level AUROC:

    autoencoder (tiny, 20 ep)             0.443 [0.426, 0.459]
    pixel_mahalanobis (16 x 16)           0.729 [0.650, 0.807]
    contrastive (digitanatomy, 30 ep)     0.585 [0.503, 0.668]   - AE +0.143 [+0.067, +0.218]   - floor -0.143 [-0.252, -0.035]
    contrastive, crop 0.4 / rotation 10   0.606 [0.537, 0.674]   - AE +0.163 [+0.101, +0.225]   - floor -0.123 [-0.167, -0.079]
    per type (default / crop 0.4): missing 0.769 / 0.780, misorder 0.542 / 0.607, flip 0.520 / 0.541, zero 0.510 / 0.495
    (no type leaks: hflip_prob = 0 on digits, and the contrastive negatives are other images)

synthetic-brain slices (60 train volumes, 512 training slices sampled per seed; 100 test volumes),
volume-level AUROC (max over slices); dino_negatives ``brain-slices`` preset, 12 epochs:

    autoencoder (tiny, 10 ep)             0.806 [0.629, 0.982]
    pixel_mahalanobis                     0.811 [0.620, 1.003]
    dino, no negatives (lambda 0)         0.798 [0.655, 0.942]   - AE -0.007 [-0.040, +0.025]   - floor -0.013 [-0.096, +0.070]
    dino, rot negatives (lambda 1)        0.815 [0.716, 0.915]   all types
        without "rotation" (leaks)        0.812 [0.723, 0.902]   - AE +0.023 [-0.076, +0.122]   - floor +0.002 [-0.144, +0.148]
                                                                 - no negatives +0.014 [-0.046, +0.073]
    per type (rot / no neg): rotation* 0.834 / 0.795, copy_paste 0.898 / 0.873, intensity_blob 0.595 / 0.560,
        mask 0.765 / 0.784, permutation 0.960 / 0.948, scar 0.664 / 0.642, sobel_filter 0.991 / 0.982
    contrastive (tiny, 20 ep)             0.797 [0.740, 0.854]   - AE -0.008 [-0.128, +0.111]   - floor -0.014 [-0.153, +0.126]
    slice-level AUROC: dino rot 0.761, no neg 0.765, autoencoder 0.828, pixel_mahalanobis 0.835 (means)

Sensitivity score (Sec. 6.1.5) vs test AUROC across the six trained models of each data set:
Spearman +0.09 (DigitAnatomy contrastive, 6 models, p 0.87), -0.65 (brain, DINO and contrastive, 9 models,
p 0.06): not reproduced at this scale (the seed, i.e. the data draw, moves both more than the method).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medood.methods import get
from medood.methods.base import AnomalyMethod
from medood.platform.train import step_optimizers

# run name -> (method, dataset, preset, overrides)
RUNS: dict[str, tuple[str, str, str, dict]] = {
    "contrastive": ("contrastive_mahalanobis", "digitanatomy", "digitanatomy", {}),
    "autoencoder": ("autoencoder", "digitanatomy", "tiny", {"image_size": 96, "epochs": 20}),
    "pixel_mahalanobis": ("pixel_mahalanobis", "digitanatomy", "paper", {"image_size": 96}),
    "brain-dino-rot": ("dino_negatives", "brain", "brain-slices", {"epochs": 12}),
    "brain-dino-noneg": ("dino_negatives", "brain", "brain-slices", {"lam": 0.0, "epochs": 12}),
    "brain-contrastive": ("contrastive_mahalanobis", "brain", "tiny", {"epochs": 20}),
    "brain-autoencoder": ("autoencoder", "brain", "tiny", {"image_size": 64, "epochs": 10}),
    "brain-pixel_mahalanobis": ("pixel_mahalanobis", "brain", "paper", {"image_size": 64}),
}
# Anomaly types that share a transformation with a method's negatives (dino: by ``shift``) or with
# its positive augmentations (learned invariances).
DIGIT_SHARED = {"rot": (), "rot360": (), "perm4": ("misorder",), "perm16": ("misorder",), "pixperm": ()}
BRAIN_SHARED = {"rot": ("rotation",), "rot360": ("rotation",), "perm4": ("permutation",), "perm16": ("permutation",),
                "pixperm": ("permutation",)}


def leaking_types(method: AnomalyMethod, dataset: str) -> list[str]:
    c = method.config
    if method.name == "dino_negatives" and c.lam > 0 and c.shift not in ("none", "identity"):
        return list((DIGIT_SHARED if dataset == "digitanatomy" else BRAIN_SHARED)[c.shift])
    if method.name == "contrastive_mahalanobis" and dataset == "digitanatomy" and c.hflip_prob > 0:
        return ["flip"]  # flip invariance learned from the augmentation
    return []


def digit_data(seed: int, n_train: int, n_test: int, size: int = 96) -> dict[str, np.ndarray]:
    from benchmarks.squid_experiment import make_data

    data = make_data(seed, n_train, n_test, size)
    kinds = data["kind"]
    return {"train": data["train"].astype(np.float32), "test": data["test"].astype(np.float32),
            "labels": (kinds != "normal").astype(int), "kind": kinds, "case": np.arange(len(kinds))}


def brain_data(seed: int, n_train: int, n_test: int, cache: Path) -> dict[str, np.ndarray]:
    from benchmarks.mae_experiment import load_data

    data = load_data(seed, n_train, n_test, cache)
    data["kind"] = data["case_type"][data["case"]]
    return data


def train(method: AnomalyMethod, images: torch.Tensor, seed: int) -> dict[str, float]:
    """The platform's loop in miniature; returns the last epoch's mean of every logged value."""
    torch.manual_seed(seed)
    batch_size, last = method.config.batch_size, {}
    for stage in method.stages():
        optimizers = method.configure_optimizers(stage.name)
        schedulers = method.configure_schedulers(stage.name, optimizers)
        for _ in range(stage.epochs):
            method.train()
            order, logs = torch.randperm(len(images)), {}
            for start in range(0, len(images) - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                losses = method.training_step({"image": images[idx], "id": [f"train{i}" for i in idx.tolist()]}, stage.name)
                step_optimizers(optimizers, losses)
                for key, value in losses.items():
                    logs.setdefault(key, []).append(float(value.detach()))
            for scheduler in schedulers.values():
                scheduler.step()
            last = {k: round(float(np.mean(v)), 4) for k, v in logs.items()}
    return last


def batches(images: torch.Tensor, prefix: str, size: int = 64):
    for start in range(0, len(images), size):
        yield {"image": images[start : start + size], "id": [f"{prefix}{i}" for i in range(start, min(start + size, len(images)))]}


@torch.no_grad()
def evaluate(method: AnomalyMethod, data: dict[str, np.ndarray], dataset: str) -> dict:
    from medood.platform.metrics import label_free_sensitivity

    method.eval()
    train_images, test = torch.from_numpy(data["train"]), torch.from_numpy(data["test"])
    method.fit_reference(batches(train_images, "train"))
    scores = torch.cat([method.score(b).sample.float() for b in batches(test, "test")]).numpy()
    labels, kind, case = data["labels"], data["kind"], data["case"]
    out = {"auroc": round(float(roc_auc_score(labels, scores)), 4)}
    # Per anomaly type: the digits are one image per case; brain volumes take the max over their slices.
    case_ids = np.unique(case)
    case_score = np.array([scores[case == c].max() for c in case_ids])
    case_kind = np.array([kind[case == c][0] for c in case_ids])
    case_label = (case_kind != "normal").astype(int)
    if dataset == "brain":
        out["volume_auroc"] = round(float(roc_auc_score(case_label, case_score)), 4)
    per_type = {}
    for t in sorted(set(case_kind) - {"normal"}):
        keep = (case_kind == t) | (case_label == 0)
        per_type[t] = round(float(roc_auc_score(case_label[keep], case_score[keep])), 4)
    out["per_type"] = per_type
    # AUROC without each anomaly type, so a baseline can be compared on the same types as a run whose
    # negatives leak one of them.
    out["auroc_without"] = {
        t: round(float(roc_auc_score(case_label[case_kind != t], case_score[case_kind != t])), 4) for t in per_type
    }
    leaking = leaking_types(method, dataset)
    out["leaking"] = leaking
    keep = ~np.isin(case_kind, leaking)
    out["auroc_clean"] = round(float(roc_auc_score(case_label[keep], case_score[keep])), 4)
    if hasattr(method, "sensitivity_scores"):
        normal = test[torch.from_numpy(labels == 0)]
        test_in = torch.cat([method.sensitivity_scores(b) for b in batches(normal, "test")]).numpy()
        out["sensitivity"] = round(label_free_sensitivity(method.sensitivity_reference().numpy(), test_in), 4)
    return out


def run_one(run: str, seed: int, data: dict, overrides: dict) -> dict:
    name, dataset, preset, base = RUNS[run]
    torch.manual_seed(seed)
    method = get(name).build(preset, **{**base, **overrides, "seed": seed})
    t0 = time.perf_counter()
    last = train(method, torch.from_numpy(data["train"]), seed) if method.trainable else {}
    result = {"run": run, "dataset": dataset, "seed": seed, "overrides": overrides, "last_epoch": last,
              "train_s": round(time.perf_counter() - t0, 1)}
    return {**result, **evaluate(method, data, dataset)}


def summary(path: str) -> None:
    """Mean and 95% t-interval per run, and paired differences to the autoencoder and the floor."""
    from scipy import stats

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["run"] + (json.dumps(r["overrides"]) if r["overrides"] else "")), {})[r["seed"]] = r

    def interval(values: list[float]) -> str:
        v = np.asarray(values, dtype=float)
        if len(v) < 2:
            return f"{v.mean():.3f}"
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        return f"{v.mean():+.3f} [{v.mean() - half:+.3f}, {v.mean() + half:+.3f}]"

    for dataset in sorted({r["dataset"] for r in rows}):
        # Does the label-free sensitivity score rank the trained models like their test AUROC (thesis Fig. 6.3)?
        metric = "volume_auroc" if dataset == "brain" else "auroc"
        pairs = [(r["sensitivity"], r[metric]) for r in rows if r["dataset"] == dataset and r.get("sensitivity") is not None]
        if len(pairs) >= 3:
            rho, p = stats.spearmanr(*zip(*pairs, strict=True))
            print(f"{dataset}: Spearman(sensitivity, {metric}) over {len(pairs)} trained models = {rho:+.2f} (p = {p:.2f})")
    for (dataset, run), seeds in sorted(by.items()):
        metric = "volume_auroc" if dataset == "brain" else "auroc"
        values = [seeds[s][metric] for s in sorted(seeds)]
        clean = [seeds[s]["auroc_clean"] for s in sorted(seeds)]
        line = f"{dataset:<13} {run:<34} seeds {sorted(seeds)}  {metric} {interval(values)}  clean {interval(clean)}"
        sens = [seeds[s].get("sensitivity") for s in sorted(seeds)]
        if all(v is not None for v in sens):
            line += f"  sensitivity {interval(sens)}"
        print(line)
        types = sorted(seeds[min(seeds)]["per_type"])
        print("    per type: " + ", ".join(
            f"{t}{'*' if t in seeds[min(seeds)]['leaking'] else ''} {np.mean([seeds[s]['per_type'][t] for s in seeds]):.3f}"
            for t in types))
        bases = ["autoencoder", "pixel_mahalanobis"] + (["dino-noneg"] if run.startswith("brain-dino-rot") else [])
        for base in bases:
            key = (dataset, base if dataset == "digitanatomy" else f"brain-{base}")
            if key not in by or key[1] == run:
                continue
            common = sorted(set(seeds) & set(by[key]))
            leaking = seeds[min(seeds)]["leaking"]
            if len(leaking) > 1:
                continue  # baselines store AUROC without one type at a time
            if leaking and not all("auroc_without" in by[key][s] for s in common):
                continue

            def base_value(row, leaking=leaking, metric=metric):
                return row["auroc_without"][leaking[0]] if leaking else row[metric]

            if len(common) >= 2:
                diff = [seeds[s]["auroc_clean"] - base_value(by[key][s]) for s in common]
                print(f"    clean - {base} (same types): {interval(diff)} (paired, seeds {common})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["contrastive"], choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=None, help="digits: images (600); brain: volumes (60)")
    parser.add_argument("--n-test", type=int, default=None, help="digits: images (400); brain: volumes (100)")
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training images (by seed)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value for every run")
    parser.add_argument("--cache", default="/tmp/medood-ssl-negatives-cache",
                        help="brain arrays (benchmarks/mae_experiment.py's cache files are reused as is)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--summary", default=None, help="only summarise a JSON-lines file")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return
    torch.set_num_threads(1)
    overrides = dict(item.split("=", 1) for item in args.set)
    for seed in args.seeds:
        cached: dict[str, dict] = {}
        for run in args.runs:
            dataset = RUNS[run][1]
            if dataset not in cached:
                if dataset == "digitanatomy":
                    cached[dataset] = digit_data(seed, args.n_train or 600, args.n_test or 400)
                else:
                    cached[dataset] = brain_data(seed, args.n_train or 60, args.n_test or 100, Path(args.cache))
                if args.max_train and len(cached[dataset]["train"]) > args.max_train:
                    keep = np.sort(np.random.default_rng([seed, 7]).choice(len(cached[dataset]["train"]), args.max_train, replace=False))
                    cached[dataset]["train"] = cached[dataset]["train"][keep]
            result = run_one(run, seed, cached[dataset], overrides)
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
