"""The autoencoder's reference-standardised maps (``map_reference``) on synthetic-brain, in memory.

Per seed (data seed = training seed) it generates the synthetic-brain set (MOOD layout), trains the
autoencoder once per variant on the ``brain_train`` normals and scores every ``toy`` case with the
same weights three ways: the raw squared-error map (``map_reference=none``), the standardised squared
error (``error``) and the standardised signed residual (``residual``), each refitted on the normal
training cases. Beside them the voxel z-score floor. With ``--slices`` also the 2D autoencoder on
axial slices (2D-on-3D as the platform does it: slices with under ``min_foreground`` non-zero voxels
are left out, their maps stay 0, a volume's score is the max over its slices).

Prints sample AUROC and voxel AP pooled over all test voxels (the MOOD protocol, via
``medood.platform.metrics``), per seed and as means with 95% t-intervals over seeds, and the paired
differences to the raw map and to the floor; writes JSON. Pure PyTorch, no Ray: the figures that count
come from ``benchmarks/accuracy.py``.

    python benchmarks/ae3d_maps_experiment.py --seeds 0 1 2                  # demo scale: 48^3, 40 + 80
    python benchmarks/ae3d_maps_experiment.py --seeds 0 1 2 --size 64 --n-test 200 --ae "tiny3d:epochs=20"

Measured at demo scale (48^3, 40 train / 80 test volumes, seeds 0-2 = data and training seed, one
thread), ``--ae "tiny3d-10ep:tiny3d:epochs=10" "denoising3d:denoising3d:"
"denoising3d-no-median:denoising3d:map_median=0"``; voxel AP mean (95% t-interval) and per seed:

    voxel_zscore (the floor)               0.434 (0.357..0.512)   0.439 0.401 0.463
    voxel_zscore median 5                  0.513 (0.492..0.534)   0.517 0.503 0.519
    tiny3d 10 epochs [residual]            0.314 (0.192..0.435)   (the demo's 3D run before)
    denoising3d [residual] (the preset)    0.602 (0.454..0.749)   0.631 0.533 0.640
    denoising3d, no median [residual]      0.430 (0.323..0.537)   (retrained from other initial
                                                                   weights: models are built before
                                                                   ``fit`` seeds torch)

Paired differences of the preset: vs the floor +0.167 (+0.090..+0.244) voxel AP and +0.059
(+0.037..+0.081) AUROC; vs the median-filtered floor +0.089 (-0.038..+0.215) voxel AP (not
significant over 3 seeds) and +0.050 (+0.029..+0.072) AUROC. Without the median filter the denoising
autoencoder's map is level with the floor's (-0.004 (-0.112..+0.103)); the plain autoencoder's stays
below it (-0.121 (-0.164..-0.077)), and trained longer it copies more of the anomaly (voxel AP falls).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from joint_embedding_experiment import fit, load, score, t_interval

from medood import methods
from medood.platform import metrics
from medood.platform.data.synthetic import synthesize

RESULTS = Path(__file__).parent / "results"
MAPS = ("none", "error", "residual")


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``LABEL:preset:key=value,...`` or ``preset:key=value,...`` (label = the whole text)."""
    parts = text.split(":")
    label = parts[0] if len(parts) == 3 else text
    preset, rest = parts[-2], parts[-1]
    # Split on the commas that start a new key, so tuples stay whole: channels=8,16,32,epochs=30.
    return label, preset, dict(kv.split("=", 1) for kv in re.split(r",(?=\w+=)", rest) if kv)


def train_mse(model: methods.AnomalyMethod, x: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        errors = [float(((model.reconstruct(b) - b) ** 2).mean()) for b in torch.from_numpy(x)[:, None].split(8)]
    return float(np.mean(errors))


def slices_of(volumes: np.ndarray, min_foreground: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Axial planes (axis 2 of the stored array) with enough foreground, and their (volume, index)."""
    planes, where = [], []
    for v, volume in enumerate(volumes):
        for k in range(volume.shape[2]):
            plane = volume[:, :, k]
            if np.count_nonzero(plane > 1e-3) >= min_foreground * plane.size:
                planes.append(plane)
                where.append((v, k))
    return np.stack(planes)[:, None], where


@torch.no_grad()
def score_slices(model: methods.AnomalyMethod, data: dict, min_foreground: float) -> dict:
    model.eval()
    planes, where = slices_of(data["test"], min_foreground)
    volume_maps = np.zeros(data["test"].shape, np.float32)
    volume_scores = np.full(len(data["test"]), -np.inf)
    for i in range(0, len(planes), 64):
        s = model.score({"image": torch.from_numpy(planes[i:i + 64])})
        for j, (v, k) in enumerate(where[i:i + 64]):
            volume_maps[v, :, :, k] = s.map[j, 0].numpy()
            volume_scores[v] = max(volume_scores[v], float(s.sample[j]))
    labels = data["labels"]
    volume_scores[~np.isfinite(volume_scores)] = volume_scores[np.isfinite(volume_scores)].min()
    return {"auroc": metrics.auroc(labels, volume_scores),
            "pixel_ap": metrics.pixel_average_precision(data["masks"], volume_maps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--ae", nargs="*", default=["demo:tiny3d:epochs=10"],
                        help="3D autoencoders: [LABEL:]PRESET:key=value,... (image_size = --size)")
    parser.add_argument("--slices", nargs="*", default=[],
                        help="2D autoencoders on axial slices, as --ae (the demo's: 'demo 2D:tiny:epochs=6')")
    parser.add_argument("--min-foreground", type=float, default=0.2)
    parser.add_argument("--std-floors", nargs="*", type=float, default=[1.0],
                        help="reference_std_floor values to score the 3D maps with (the first is unlabelled)")
    parser.add_argument("--floor-median", type=int, default=5,
                        help="also score the floor with this median filter (map_median; 0 = not)")
    parser.add_argument("--out", default=str(RESULTS / "ae3d_maps_experiment.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[int, dict]] = {}
    work = Path(tempfile.mkdtemp(prefix="ae3d-maps-"))

    def record(name: str, seed: int, result: dict) -> None:
        results.setdefault(name, {})[seed] = result
        print(f"{name} seed {seed}: AUROC {result['auroc']:.3f}  voxel AP {result['pixel_ap']:.3f}", flush=True)

    for seed in args.seeds:
        root = work / f"brain{seed}"
        synthesize("synthetic-brain", root, seed=seed, n_train=args.n_train, n_test=args.n_test, size=args.size)
        data = load(root)
        floor = methods.get("voxel_zscore").build("paper", image_size=args.size, seed=seed)
        fit(floor, data["train"], 8, seed, "floor")
        record("voxel_zscore", seed, score(floor, data))
        if args.floor_median:  # the floor given the denoising preset's post-processing
            floor.config.map_median = args.floor_median
            record(f"voxel_zscore median {args.floor_median}", seed, score(floor, data))
        for text in args.ae:
            label, preset, overrides = parse_variant(text)
            # Built with a reference so its buffers exist; the same weights are then scored every way.
            model = methods.get("autoencoder").build(preset, **{**overrides, "image_size": args.size, "seed": seed,
                                                                "map_reference": "error"})
            wall = fit(model, data["train"], model.config.batch_size, seed, f"{label} s{seed}")
            mse = train_mse(model, data["train"])
            print(f"{label} seed {seed}: trained in {wall:.0f} s, train MSE {mse:.4f}", flush=True)
            for kind in MAPS:
                model.config.map_reference = kind
                model.fit_reference([{"image": b} for b in torch.from_numpy(data["train"])[:, None].split(8)])
                for std_floor in args.std_floors if kind != "none" else [None]:
                    if std_floor is not None:
                        model.config.reference_std_floor = std_floor
                    suffix = "" if std_floor in (None, args.std_floors[0]) else f" floor {std_floor:g}"
                    record(f"AE3D {label} [{kind}{suffix}]", seed, {**score(model, data), "train_mse": mse, "wall_s": wall})
        for text in args.slices:
            label, preset, overrides = parse_variant(text)
            model = methods.get("autoencoder").build(preset, **{**overrides, "image_size": args.size, "seed": seed,
                                                                "map_reference": "error"})
            planes, _ = slices_of(data["train"], args.min_foreground)
            t0 = time.perf_counter()
            fit(model, planes[:, 0], model.config.batch_size, seed, f"{label} s{seed}")
            mse = train_mse(model, planes[:, 0])
            print(f"{label} seed {seed}: {len(planes)} slices, trained in {time.perf_counter() - t0:.0f} s, "
                  f"train MSE {mse:.4f}", flush=True)
            for kind in MAPS:
                model.config.map_reference = kind
                model.fit_reference([{"image": b} for b in torch.from_numpy(planes).split(64)])
                record(f"AE2D {label} [{kind}]", seed, {**score_slices(model, data, args.min_foreground), "train_mse": mse})

    print(f"\n{'run':<34} {'AUROC (95% CI)':<24} {'voxel AP (95% CI)':<24} per seed AP")
    for name, per_seed in results.items():
        a = t_interval([r["auroc"] for r in per_seed.values()])
        p = t_interval([r["pixel_ap"] for r in per_seed.values()])
        seeds = " ".join(f"{r['pixel_ap']:.3f}" for r in per_seed.values())
        print(f"{name:<34} {a[0]:.3f} ({a[1]:.3f}..{a[2]:.3f})   {p[0]:.3f} ({p[1]:.3f}..{p[2]:.3f})   {seeds}")
    differences = {}
    for name in results:
        if not name.endswith("]") or name.endswith("[none]"):
            continue
        raw = name.rsplit("[", 1)[0] + "[none]"
        if raw not in results:
            continue
        for other in (raw, "voxel_zscore", f"voxel_zscore median {args.floor_median}"):
            if other not in results:
                continue
            for key in ("auroc", "pixel_ap"):
                common = sorted(set(results[name]) & set(results[other]))
                d = t_interval([results[name][s][key] - results[other][s][key] for s in common])
                differences[f"{name} - {other} [{key}]"] = d
                print(f"{name} - {other} [{key}]: {d[0]:+.3f} ({d[1]:+.3f}..{d[2]:+.3f}) over seeds {common}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "differences": differences}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
