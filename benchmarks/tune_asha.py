"""ASHA against FIFO: the same small search space on digitanatomy, swept twice with `medood.platform.tune`.

FIFO trains every sampled trial to its last epoch; ASHA (time_attr = epoch, max_t = the run's epochs,
grace period 1, reduction factor 2) stops the weak ones at its rungs. Both draw the same trials (the
space is sampled with the same seed), so the comparison is only the scheduler's. Reports each one's
best val AUROC and the trial-epochs it trained.

Goal (issue 5): ASHA's best AUROC within 0.01 of FIFO's, using at most half of FIFO's trial-epochs.
Prints a table and writes benchmarks/results/tune_asha.json.

    python benchmarks/tune_asha.py [--trials 8] [--epochs 8] [--method autoencoder] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

# A small space over the settings that matter most for the reconstruction baseline: a wide learning
# rate range (too small never learns in a few epochs, too large is unstable) and the anomaly measure.
SPACES = {
    "autoencoder": {
        "lr": {"loguniform": [1.0e-5, 1.0e-2]},
        "score": {"choice": ["mse", "mae", "ssim"]},
        "num_res_units": {"choice": [0, 1]},
    },
    "squid": {
        "lr": {"loguniform": [1.0e-5, 3.0e-3]},
        "grid": {"choice": [1, 2, 4]},
        "top_k": {"choice": [1, 5]},
    },
}
GOAL_AUROC_GAP = 0.01
GOAL_EPOCH_RATIO = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="autoencoder", choices=sorted(SPACES))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=120)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/tune_asha.json")
    args = parser.parse_args()

    from medood.platform.data.ingest import ingest
    from medood.platform.data.synthetic import synthesize
    from medood.platform.jobs import ensure_ray
    from medood.platform.tune import SweepOptions, sweep

    work = Path(args.work or tempfile.mkdtemp(prefix="medood-tune-asha-"))
    raw, shards = work / "raw", work / "shards"
    layout = synthesize("digitanatomy", raw, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed)
    ingest(layout, raw, shards, seed=args.seed, progress=False)
    space_file = work / f"{args.method}-space.yaml"
    space_file.write_text(yaml.safe_dump({"method": args.method, "space": SPACES[args.method]}))
    ensure_ray()

    figures = {}
    for scheduler in ("fifo", "asha"):
        t0 = time.perf_counter()
        result = sweep(
            SweepOptions(
                method=args.method,
                data=str(shards),
                space=str(space_file),
                preset="tiny",
                overrides={"epochs": args.epochs},
                samples=args.trials,
                scheduler=scheduler,
                grace_period=1,
                reduction_factor=2,
                out=str(work / f"sweep-{scheduler}"),
                wandb=False,
                seed=args.seed,
            )
        )
        aurocs = [t["val_auroc"] for t in result.trials if t.get("val_auroc") is not None]
        figures[scheduler] = {
            "best_val_auroc": max(aurocs) if aurocs else None,
            "best_trial": None if result.best is None else result.best["trial"],
            "trial_epochs": result.trial_epochs,
            "trials": len(result.trials),
            "stopped_early": sum(t["status"] == "stopped early" for t in result.trials),
            "wall_s": round(time.perf_counter() - t0, 1),
            "per_trial": [
                {k: t.get(k) for k in ("trial", *SPACES[args.method], "epochs_run", "val_auroc", "status")}
                for t in result.trials
            ],
        }

    fifo, asha = figures["fifo"], figures["asha"]
    gap = None
    if fifo["best_val_auroc"] is not None and asha["best_val_auroc"] is not None:
        gap = fifo["best_val_auroc"] - asha["best_val_auroc"]
    ratio = asha["trial_epochs"] / fifo["trial_epochs"] if fifo["trial_epochs"] else None
    met = gap is not None and ratio is not None and gap <= GOAL_AUROC_GAP and ratio <= GOAL_EPOCH_RATIO
    print(f"\n{args.method} tiny on digitanatomy ({args.n_train} train images, {args.size} px): "
          f"{args.trials} trials x {args.epochs} epochs, same sampled configs\n")
    print(f"{'scheduler':<10} {'best val AUROC':>15} {'trial-epochs':>13} {'stopped early':>14} {'wall s':>8}")
    for name, f in figures.items():
        best = "–" if f["best_val_auroc"] is None else f"{f['best_val_auroc']:.4f}"
        print(f"{name:<10} {best:>15} {f['trial_epochs']:>13} {f['stopped_early']:>14} {f['wall_s']:>8}")
    print(f"\nASHA - FIFO best AUROC: {'–' if gap is None else f'{-gap:+.4f}'} (goal >= -{GOAL_AUROC_GAP}); "
          f"trial-epochs ratio {'–' if ratio is None else f'{ratio:.2f}'} (goal <= {GOAL_EPOCH_RATIO}); "
          f"{'goal met' if met else 'goal NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "tune_asha",
                "method": args.method,
                "preset": "tiny",
                "dataset": {"name": "digitanatomy", "n_train": args.n_train, "n_test": args.n_test, "size": args.size},
                "space": SPACES[args.method],
                "trials": args.trials,
                "epochs": args.epochs,
                "asha": {"time_attr": "epoch", "max_t": args.epochs, "grace_period": 1, "reduction_factor": 2},
                "results": figures,
                "auroc_gap": gap,
                "trial_epoch_ratio": ratio,
                "goal": {"auroc_gap_at_most": GOAL_AUROC_GAP, "trial_epoch_ratio_at_most": GOAL_EPOCH_RATIO},
                "goal_met": met,
                "work": str(work),
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
