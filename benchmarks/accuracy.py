"""Accuracy of every method against the autoencoder baseline on the embedded data (tiny presets, CPU).

Each run trains with Ray Train through the platform (`medood.platform.train.train`) and is evaluated
on its test split (`medood.platform.evaluate.evaluate`), so the figures are what users get. Runs:

- digitanatomy (2D): autoencoder, SQUID 2x2 grid, SQUID 1x1 grid;
- synthetic-brain 2D axial slices: autoencoder, mae_classifier (classifier score) and the same
  trained MAE scored by SSIM alone (seed 001 Table 2a's MAE-only row).

Goals (issue 4): SQUID beats the autoencoder on digitanatomy, and its 2x2 grid beats 1x1;
mae_classifier beats its own MAE-only SSIM score on brain slices. Prints a table and writes
benchmarks/results/accuracy.json. Each run is capped by its epochs to stay within 15 minutes on 2 cores.

    python benchmarks/accuracy.py [--only squid] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

DATA = {
    "digitanatomy": {"n_train": 500, "n_test": 200, "size": 64},
    "synthetic-brain": {"n_train": 40, "n_test": 40, "size": 64},
}
SLICES = {"slice_axis": 2, "min_foreground": 0.2}
RUNS = [
    # name, method, dataset, overrides, data options
    ("autoencoder", "autoencoder", "digitanatomy", {"epochs": 20}, {}),
    ("squid grid 2x2", "squid", "digitanatomy", {"epochs": 20, "grid": 2}, {}),
    ("squid grid 1x1", "squid", "digitanatomy", {"epochs": 20, "grid": 1}, {}),
    ("autoencoder (slices)", "autoencoder", "synthetic-brain", {"epochs": 10}, SLICES),
    ("mae_classifier (slices)", "mae_classifier", "synthetic-brain", {"mae_epochs": 15, "classifier_epochs": 5}, SLICES),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="substring of the run names to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = parser.parse_args()

    from medood.platform import checkpoint as ckpt
    from medood.platform.data.ingest import ingest
    from medood.platform.data.synthetic import synthesize
    from medood.platform.evaluate import evaluate
    from medood.platform.jobs import ensure_ray
    from medood.platform.train import TrainOptions, train

    work = Path(args.work or tempfile.mkdtemp(prefix="medood-accuracy-"))
    os.environ.setdefault("MEDOOD_HOME", str(work / "home"))
    shards = {}
    for kind, sizes in DATA.items():
        if not (work / "shards" / kind / "manifest.json").exists():
            layout = synthesize(kind, work / "raw" / kind, seed=args.seed, **sizes)
            ingest(layout, work / "raw" / kind, work / "shards" / kind, seed=args.seed, progress=False)
        shards[kind] = work / "shards" / kind
    ensure_ray()

    rows = []
    for name, method, dataset, overrides, data_options in RUNS:
        if args.only and args.only not in name:
            continue
        t0 = time.perf_counter()
        run = train(
            TrainOptions(
                method=method, data=str(shards[dataset]), out=str(work / "runs" / name.replace(" ", "_")),
                preset="tiny", overrides={**overrides, "seed": args.seed}, data_options=data_options, wandb=False,
            )
        )
        wall = time.perf_counter() - t0
        results = evaluate(run.path, shards[dataset], out=work / "eval" / name.replace(" ", "_"), n_bootstrap=200)
        rows.append(_row(name, method, dataset, results, wall))
        if method == "mae_classifier":
            # The same trained MAE, scored by SSIM of its reconstruction alone (Table 2a, MAE-only).
            payload = ckpt.read_payload(ckpt.resolve(run.path))
            payload["config"]["score"] = "ssim"
            ssim_dir = work / "runs" / "mae_only_ssim"
            ssim_dir.mkdir(parents=True, exist_ok=True)
            torch.save(payload, ssim_dir / ckpt.MODEL_FILE)
            results = evaluate(ssim_dir, shards[dataset], out=work / "eval" / "mae_only_ssim", n_bootstrap=200)
            rows.append(_row("MAE-only SSIM (same MAE)", method, dataset, results, 0.0))

    print(f"\n{'run':<28} {'dataset':<16} {'unit':<7} {'AUROC':>7} {'AP':>7} {'vol AUROC':>9} {'wall (s)':>9}")
    for r in rows:
        print(
            f"{r['run']:<28} {r['dataset']:<16} {r['unit']:<7} {r['auroc']:>7.3f} {r['ap']:>7.3f} "
            f"{r.get('case_auroc', float('nan')):>9.3f} {r['wall_s']:>9.0f}"
        )
    by = {r["run"]: r for r in rows}
    goals = {}
    if {"autoencoder", "squid grid 2x2"} <= set(by):
        goals["squid > autoencoder (digitanatomy)"] = by["squid grid 2x2"]["auroc"] > by["autoencoder"]["auroc"]
    if {"squid grid 2x2", "squid grid 1x1"} <= set(by):
        goals["squid 2x2 > 1x1"] = by["squid grid 2x2"]["auroc"] > by["squid grid 1x1"]["auroc"]
    if {"mae_classifier (slices)", "MAE-only SSIM (same MAE)"} <= set(by):
        goals["mae_classifier > MAE-only SSIM"] = (
            by["mae_classifier (slices)"]["auroc"] > by["MAE-only SSIM (same MAE)"]["auroc"]
        )
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": rows, "goals": goals, "work": str(work)}, indent=2))
    print(f"wrote {args.out}")


def _row(name: str, method: str, dataset: str, results: dict, wall: float) -> dict:
    sample = results["sample"]
    row = {
        "run": name, "method": method, "dataset": dataset, "unit": "slice" if "case" in results else "image",
        "auroc": sample.get("auroc", float("nan")), "ap": sample.get("ap", float("nan")), "wall_s": wall,
        "auroc_ci95": sample.get("auroc_ci95"),
    }
    if "case" in results:
        row["case_auroc"] = results["case"].get("auroc", float("nan"))
    if "pixel" in results:
        row["pixel_ap"] = results["pixel"].get("ap")
    return row


if __name__ == "__main__":
    main()
