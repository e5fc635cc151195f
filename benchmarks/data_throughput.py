"""Volumes per second: shards streamed through ``read_split`` vs per-file ``.nii.gz`` with MONAI.

Same 128^3 volumes, same cores (2 worker processes for the per-file baselines; Ray with the same CPU
count for the shards). The ceiling reads the same decoded bytes uncompressed (.npy) from the page cache.
Each path runs one warm-up pass first, then the timed passes. Prints a table and writes
benchmarks/results/data_throughput.json. Goal: shards >= 3x the per-file NIfTI rate.

    python benchmarks/data_throughput.py [--volumes 32] [--size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def load_nifti(path: str) -> tuple[int, ...]:
    from monai.transforms import LoadImage

    return tuple(LoadImage(image_only=True, dtype=np.float32)(path).shape)


def load_npy(path: str) -> tuple[int, ...]:
    return np.load(path).astype(np.float32, copy=False).shape


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (imports, page cache, Ray Data start)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = parser.parse_args()

    from medood.platform.data.ingest import ingest
    from medood.platform.data.stream import read_split
    from medood.platform.data.synthetic import synthesize
    from medood.platform.jobs import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="medood-bench-"))
    os.environ.setdefault("MEDOOD_HOME", str(work / "home"))
    print(f"generating {args.volumes} volumes of {args.size}^3 in {work} ...")
    layout = synthesize("synthetic-brain", work / "raw", n_train=args.volumes, n_test=2, size=args.size, seed=0)
    ingest(layout, work / "raw", work / "shards", progress=False)
    files = sorted(str(p) for p in (work / "raw" / "brain_train").glob("*.nii.gz"))
    npy_dir = work / "npy"
    npy_dir.mkdir()
    for path in files:
        np.save(npy_dir / (Path(path).name + ".npy"), np.asarray(load_nifti_array(path)))
    npys = sorted(str(p) for p in npy_dir.glob("*.npy"))

    ensure_ray(num_cpus=args.cpus)
    dataset = read_split(work / "shards", "train", None, batch_size=2)

    def shards() -> int:
        n = 0
        for batch in dataset.iter_batches(batch_size=4, batch_format="numpy"):
            n += len(batch["id"])
        return n

    with ProcessPoolExecutor(args.cpus) as pool:

        def nifti() -> int:
            return len(list(pool.map(load_nifti, files)))

        def ceiling() -> int:
            return len(list(pool.map(load_npy, npys)))

        rates = {
            "shards (read_split, Ray Data)": timed(shards, args.repeats),
            "per-file .nii.gz (MONAI LoadImage)": timed(nifti, args.repeats),
            "ceiling (.npy from page cache)": timed(ceiling, args.repeats),
        }
    base = rates["per-file .nii.gz (MONAI LoadImage)"]
    print(f"\n{args.volumes} volumes of {args.size}^3 float32, {args.cpus} CPUs")
    print(f"{'path':<40} {'volumes/s':>10} {'vs NIfTI':>9}")
    for name, rate in rates.items():
        print(f"{name:<40} {rate:>10.1f} {rate / base:>8.2f}x")
    goal = rates["shards (read_split, Ray Data)"] / base >= 3.0
    print(f"\ngoal (shards >= 3x per-file NIfTI): {'met' if goal else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"volumes": args.volumes, "size": args.size, "cpus": args.cpus, "volumes_per_s": rates,
             "shards_vs_nifti": rates["shards (read_split, Ray Data)"] / base, "goal_met": goal},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def load_nifti_array(path: str) -> np.ndarray:
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(image_only=True, dtype=np.float32)(path))


if __name__ == "__main__":
    main()
