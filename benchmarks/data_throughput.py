"""Images per second: shards streamed through ``read_split`` vs per-file loading vs the format's ceiling.

Two data sets, each measured side by side in one run, every path yielding the stored images as
float32 arrays:

- 3D: ``--volumes`` synthetic-brain volumes of ``--size``^3 (float32 ``.nii.gz``, ingested into shards);
- 2D: ``--images`` digitanatomy images of ``--size-2d``^2 (PNG files, ingested into shards).

Paths:

- ``read_split``: the shards through Ray Data (``read_split(..., spec=None)``), Ray with ``--cpus`` CPUs;
  also the first-batch latency of a pass, and a pass over the same dataset materialized once
  (what a training epoch iterates when the preprocessed split fits in the object store);
- per-file: MONAI ``LoadImage`` on the source files (``.nii.gz`` / PNG) in ``--cpus`` processes;
- pyarrow ceiling: the same shards read and decoded with pyarrow and numpy in ``--cpus`` plain
  processes, one Parquet row group per call (no Ray).

Each path runs one warm-up pass, then ``--repeats`` timed passes (the median is reported). Prints
tables and writes ``benchmarks/results/data_throughput.json`` with the rates, the ratios and the
load average. Goals (issue 10): ``read_split`` >= 3x per-file NIfTI and >= 60% of the pyarrow
ceiling for 128^3 volumes; first batch within 0.5 s.

    python benchmarks/data_throughput.py [--volumes 48] [--size 128] [--images 512] [--size-2d 256]
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

_LOADER = None


def load_file(path: str) -> int:
    """One file through MONAI ``LoadImage``, built once per process (as a user's Dataset would hold it)."""
    global _LOADER
    if _LOADER is None:
        import warnings

        from monai.transforms import LoadImage

        with warnings.catch_warnings():  # MONAI's note that the optional nvImageCodec DICOM plugin is absent
            warnings.simplefilter("ignore")
            _LOADER = LoadImage(image_only=True, dtype=np.float32)
    return int(np.asarray(_LOADER(path)).size > 0)


def pyarrow_row_group(task: tuple[str, int]) -> int:
    """Read one row group of a shard and decode its train images to float32 arrays (the format's ceiling).

    Self-contained (pyarrow and numpy only), so the benchmark also runs against older medood code.
    """
    import pyarrow.parquet as pq

    path, group = task
    table = pq.ParquetFile(path).read_row_group(group, columns=["split", "shape", "dtype", "image"])
    splits, shapes, dtypes = (table.column(k).to_pylist() for k in ("split", "shape", "dtype"))
    n, row = 0, 0
    for chunk in table.column("image").chunks:
        buffers = chunk.buffers()
        offsets = np.frombuffer(buffers[1], np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(buffers[2], np.uint8)
        for i in range(len(chunk)):
            if splits[row] == "train":
                view = data[offsets[i] : offsets[i + 1]]
                image = np.frombuffer(view, np.dtype(dtypes[row])).reshape(shapes[row]).astype(np.float32, copy=False)
                n += int(image.size > 0)
            row += 1
    return n


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (imports, page cache, Ray workers)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates)), rates


def measure(name: str, shards: Path, files: list[str], args: argparse.Namespace, pool: ProcessPoolExecutor) -> dict:
    import pyarrow.parquet as pq

    from medood.platform.data.stream import read_split, shard_paths

    dataset = read_split(shards, "train", None, batch_size=4)
    first_batch: list[float] = []

    def stream(ds=dataset, record=True) -> int:
        t0 = time.perf_counter()
        n = 0
        for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
            if n == 0 and record:
                first_batch.append(time.perf_counter() - t0)
            n += len(batch["id"])
        return n

    groups = [(p, g) for p in shard_paths(shards) for g in range(pq.ParquetFile(p).num_row_groups)]

    def per_file() -> int:
        return sum(pool.map(load_file, files))

    def ceiling() -> int:
        return sum(pool.map(pyarrow_row_group, groups))

    rates, all_rates = {}, {}
    rates["read_split"], all_rates["read_split"] = timed(stream, args.repeats)
    materialized = dataset.materialize()
    rates["read_split materialized"], all_rates["read_split materialized"] = timed(
        lambda: stream(materialized, record=False), args.repeats
    )
    rates["per-file LoadImage"], all_rates["per-file LoadImage"] = timed(per_file, args.repeats)
    rates["pyarrow ceiling"], all_rates["pyarrow ceiling"] = timed(ceiling, args.repeats)
    base, top = rates["per-file LoadImage"], rates["pyarrow ceiling"]
    print(f"\n{name}: {len(files)} files, {len(shard_paths(shards))} shard files, {len(groups)} row groups, {args.cpus} CPUs")
    print(f"{'path':<28} {'images/s':>10} {'vs per-file':>12} {'vs ceiling':>11}")
    for key, rate in rates.items():
        print(f"{key:<28} {rate:>10.1f} {rate / base:>11.2f}x {rate / top:>10.2f}")
    print(f"first batch of a read_split pass: {', '.join(f'{t:.3f}' for t in first_batch[1:])} s")
    return {
        "files": len(files),
        "shard_files": len(shard_paths(shards)),
        "row_groups": len(groups),
        "images_per_s": rates,
        "images_per_s_all_passes": all_rates,
        "read_split_vs_per_file": rates["read_split"] / base,
        "read_split_vs_ceiling": rates["read_split"] / top,
        "materialized_vs_per_file": rates["read_split materialized"] / base,
        "first_batch_s": first_batch[1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size-2d", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = parser.parse_args()

    from medood.platform.data.ingest import ingest
    from medood.platform.data.synthetic import synthesize
    from medood.platform.jobs import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="medood-bench-"))
    os.environ.setdefault("MEDOOD_HOME", str(work / "home"))
    print(f"generating {args.volumes} volumes of {args.size}^3 and {args.images} images of {args.size_2d}^2 in {work} ...")
    layout = synthesize("synthetic-brain", work / "brain", n_train=args.volumes, n_test=2, size=args.size, seed=0)
    ingest(layout, work / "brain", work / "brain-shards", splits=(1.0, 0.0, 0.0), progress=False)
    volumes = sorted(str(p) for p in (work / "brain" / "brain_train").glob("*.nii.gz"))
    layout = synthesize("digitanatomy", work / "digits", n_train=args.images, n_test=2, size=args.size_2d, seed=0)
    ingest(layout, work / "digits", work / "digit-shards", splits=(1.0, 0.0, 0.0), progress=False)
    images = sorted(str(p) for p in (work / "digits" / "normal").glob("*.png"))[: args.images]

    ensure_ray(num_cpus=args.cpus)
    load_before = os.getloadavg()
    with ProcessPoolExecutor(args.cpus) as pool:
        results = {
            f"3d {args.size}^3 float32 (.nii.gz)": measure(f"3D, {args.size}^3", work / "brain-shards", volumes, args, pool),
            f"2d {args.size_2d}^2 (PNG)": measure(f"2D, {args.size_2d}^2", work / "digit-shards", images, args, pool),
        }
    load = [round(x, 2) for x in os.getloadavg()]
    three_d = next(iter(results.values()))
    goals = {
        "read_split >= 3x per-file NIfTI (3D)": three_d["read_split_vs_per_file"] >= 3.0,
        "read_split >= 60% of the pyarrow ceiling (3D)": three_d["read_split_vs_ceiling"] >= 0.6,
        "first batch <= 0.5 s (3D)": max(three_d["first_batch_s"]) <= 0.5,
    }
    print(f"\nload average before / after: {[round(x, 2) for x in load_before]} / {load}")
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"cpus": args.cpus, "repeats": args.repeats, "load_average_before": list(load_before),
             "load_average_after": load, "datasets": results, "goals": goals},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
