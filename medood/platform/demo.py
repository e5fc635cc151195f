"""`medood demo`: the whole platform on the embedded data and a local Ray, in a few minutes on 2 CPUs.

Generates small versions of both embedded datasets in their public layouts, ingests them through
the same path real data takes, trains every demo run with Ray Train, evaluates each on its test
split (the 3D run also writes a MOOD submission), and writes ``<out>/report.md`` linking each run's
own report and plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

# Sizes: what lets the best method on each data set find its anomalies within the 10-minute budget
# of `make demo` on 2 cores (install included). The anomalies themselves are the generators' own.
# DigitAnatomy at 96 px: the authors' digit setting, whose 3 x 3 SQUID grid matches the 3 x 3 anatomy.
DATASETS = {
    "digitanatomy": {"n_train": 320, "n_test": 300, "size": 96},
    "synthetic-brain": {"n_train": 40, "n_test": 80, "size": 48},
}


@dataclass(frozen=True)
class DemoRun:
    """One training run on one data set (also the unit of ``benchmarks/accuracy.py``)."""

    name: str
    method: str
    dataset: str
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    mood: bool = False
    floor: bool = False  # a training-free reference floor: what a learned method must beat


DEMO_RUNS = [
    DemoRun("pixel_mahalanobis-digitanatomy", "pixel_mahalanobis", "digitanatomy", preset="paper",
            overrides={"image_size": 96}, floor=True),
    DemoRun("autoencoder-digitanatomy", "autoencoder", "digitanatomy", overrides={"epochs": 10, "image_size": 96}),
    # SQUID's CPU preset (squid.py): 10 epochs, no learnable student memories or skips, per-region score.
    DemoRun("squid-digitanatomy", "squid", "digitanatomy", preset="digitanatomy-cpu"),
    DemoRun("voxel_zscore-brain", "voxel_zscore", "synthetic-brain", preset="paper",
            overrides={"image_size": 48}, mood=True, floor=True),
    # A denoising autoencoder whose residual is standardised per voxel by the normal training cases and
    # median-filtered (autoencoder.py, preset denoising3d): the one learned map here that beats the
    # voxel z-score floor's AP at this scale (benchmarks/ae3d_maps_experiment.py).
    DemoRun("autoencoder3d-brain", "autoencoder", "synthetic-brain", preset="denoising3d",
            overrides={"image_size": 48}, mood=True),
    DemoRun("autoencoder-brain-slices", "autoencoder", "synthetic-brain",
            overrides={"epochs": 6, "image_size": 48}, data_options={"slice_axis": 2, "min_foreground": 0.2}, mood=True),
]


def run_demo(out: str | Path, *, seed: int = 0, console: Console | None = None) -> Path:
    from medood.platform.data.ingest import ingest
    from medood.platform.data.synthetic import synthesize
    from medood.platform.evaluate import evaluate
    from medood.platform.jobs import ensure_ray

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shards: dict[str, Path] = {}
    for kind, sizes in DATASETS.items():
        console.rule(f"data: {kind}")
        raw = out / "data" / kind
        layout = synthesize(kind, raw, seed=seed, **sizes)
        shards[kind] = out / "shards" / kind
        ingest(layout, raw, shards[kind], seed=seed)
    ensure_ray()
    rows = []
    for run in DEMO_RUNS:
        console.rule(f"train: {run.name}")
        result, train_s = train_run(run, shards[run.dataset], out / "runs" / run.name, seed=seed, val_every=1000,
                                    wandb=True, wandb_group="demo")
        console.rule(f"evaluate: {run.name}")
        eval_dir = out / "eval" / run.name
        results = evaluate(
            result.path,
            shards[run.dataset],
            split="test",
            out=eval_dir,
            mood_dir=eval_dir / "mood" if run.mood else None,
            n_bootstrap=300,
        )
        rows.append({"run": run, "results": results, "train_s": train_s, "eval_dir": eval_dir})
    report = out / "report.md"
    report.write_text(_render(rows, out, time.perf_counter() - started))
    (out / "summary.json").write_text(
        json.dumps(
            [{"run": r["run"].name, "method": r["run"].method, "dataset": r["run"].dataset, **r["results"]} for r in rows],
            indent=2,
            default=str,
        )
    )
    return report


def train_run(run: DemoRun, shards: str | Path, out: str | Path, *, seed: int, **options: Any) -> tuple[Any, float]:
    """Train ``run`` on ``shards`` into ``out`` with Ray Train (``options``: more ``TrainOptions``); result and seconds."""
    from medood.platform.train import TrainOptions, train

    started = time.perf_counter()
    result = train(
        TrainOptions(
            method=run.method, data=str(shards), out=str(out), preset=run.preset,
            overrides={**run.overrides, "seed": seed}, data_options=run.data_options, **options,
        )
    )
    return result, time.perf_counter() - started


def findings(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per data set: the best learned run, its AUROC and interval, the types it catches and misses, the floor's figures."""
    out: dict[str, dict[str, Any]] = {}
    for dataset in dict.fromkeys(r["run"].dataset for r in rows):
        mine = [r for r in rows if r["run"].dataset == dataset]
        learned = [r for r in mine if not r["run"].floor and "auroc" in _level(r["results"])]
        floors = [r for r in mine if r["run"].floor and "auroc" in _level(r["results"])]
        if not learned:
            continue
        best = max(learned, key=lambda r: _level(r["results"])["auroc"])
        m = _level(best["results"])
        per_type = best["results"].get("per_type", {})
        # The best voxel maps may come from another run than the best case-level ranking (a 2D method's
        # slice maps against a 3D method's volume maps): the sentence names that run too.
        mapped = [r for r in learned if r["results"].get("pixel", {}).get("ap") is not None]
        maps = max(mapped, key=lambda r: r["results"]["pixel"]["ap"]) if mapped else best
        entry = {
            "run": best["run"].name,
            "auroc": m["auroc"],
            "auroc_ci95": m["auroc_ci95"],
            "caught": sorted(k for k, v in per_type.items() if v.get("auroc", 0) >= 0.8),
            "missed": sorted(k for k, v in per_type.items() if v.get("auroc", 1) < 0.65),
            "maps_run": maps["run"].name,
            "pixel_ap": maps["results"].get("pixel", {}).get("ap"),
        }
        if floors:
            floor = floors[0]
            entry["floor"] = floor["run"].name
            entry["floor_auroc"] = _level(floor["results"])["auroc"]
            entry["floor_pixel_ap"] = floor["results"].get("pixel", {}).get("ap")
        out[dataset] = entry
    return out


def _level(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("case") or results["sample"]


def _sentence(dataset: str, f: dict[str, Any]) -> str:
    low, high = f["auroc_ci95"]
    text = f"**{dataset}**: {f['run']} separates abnormal from normal test cases with AUROC {f['auroc']:.2f} (95% CI {low:.2f}-{high:.2f})"
    if "floor" in f:
        text += f" against {f['floor_auroc']:.2f} for the {f['floor']} floor"
    floor_ap = f" (floor {f['floor_pixel_ap']:.3f})" if f.get("floor_pixel_ap") is not None else ""
    own_maps = f.get("pixel_ap") is not None and f["maps_run"] == f["run"]
    text += f"; voxel AP {f['pixel_ap']:.3f}{floor_ap}." if own_maps else "."
    if f["caught"] or f["missed"]:
        caught = ", ".join(f["caught"]) or "none"
        missed = ", ".join(f["missed"]) or "none"
        text += f" Caught (type AUROC >= 0.8): {caught}; missed (< 0.65): {missed}."
    if f.get("pixel_ap") is not None and not own_maps:  # after the types, which are the best run's
        text += f" The best anomaly maps are {f['maps_run']}'s: voxel AP {f['pixel_ap']:.3f}{floor_ap}."
    return text


def _render(rows: list[dict[str, Any]], out: Path, seconds: float) -> str:
    found = findings(rows)
    lines = ["# medood demo", "", "## What was found", ""]
    lines += [f"- {_sentence(dataset, f)}" for dataset, f in found.items()]
    lines += [
        "",
        f"Both embedded data sets were generated, ingested into shards, every run trained with Ray Train on a local Ray "
        f"and evaluated on its test split, in {seconds / 60:.1f} minutes. Presets are CPU-sized (`tiny`), so these "
        "figures show the platform and the methods working at small scale, not the papers' results. Floors are "
        "training-free references (raw-pixel Mahalanobis, voxel z-score) that a learned method must beat. "
        "Thresholds were chosen on the val split by Youden's J; voxel AP and best Dice are over every voxel of the "
        "test cases in input space, as MOOD scores them.",
        "",
        "| run | method | dataset | unit | AUROC (95% CI) | AP | specificity | sensitivity | voxel AP | best Dice | train (s) | report |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        run, results = row["run"], row["results"]
        for level in ("sample", "case"):
            if level not in results:
                continue
            m = results[level]
            pixel = results.get("pixel", {}) if level == "sample" else {}
            auroc = f"{m['auroc']:.3f} ({m['auroc_ci95'][0]:.3f}-{m['auroc_ci95'][1]:.3f})" if "auroc" in m else "n/a"
            ap = f"{m['ap']:.3f}" if "ap" in m else "n/a"
            unit = {"sample": "slice" if "case" in results else "image/volume", "case": "volume (max of slices)"}[level]
            link = (row["eval_dir"] / "report.md").relative_to(out)
            spec_, sens = (f"{m[k]:.2f}" if k in m else "n/a" for k in ("specificity", "sensitivity"))
            lines.append(
                f"| {run.name} | {run.method}{' (floor)' if run.floor else ''} | {run.dataset} | {unit} | {auroc} | {ap} | "
                f"{spec_} | {sens} | {pixel.get('ap', float('nan')):.3f} | {pixel.get('best_dice', float('nan')):.3f} | "
                f"{row['train_s']:.0f} | [report]({link}) |"
            )
    lines += ["", "Each run's report holds its ROC / PR curves and anomaly-map overlays."]
    for row in rows:
        if "mood_dir" in row["results"]:
            lines.append(f"MOOD submission of {row['run'].name}: `{row['results']['mood_dir']}`.")
    return "\n".join(lines) + "\n"
