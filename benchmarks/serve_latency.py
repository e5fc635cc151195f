"""Serving latency and throughput: the Serve app against the same work done in-process.

For a 2D input (a 128x128 ``digitanatomy`` PNG, 2D autoencoder with image_size 128) and a 3D
input (a 64^3 ``synthetic-brain`` NIfTI, 3D autoencoder with image_size 64), both ``tiny``-sized
and freshly initialised, it measures p50 / p99 latency and requests per second

- in-process: ``ModelServer.prepare`` + ``forward`` + ``respond`` called directly, one request
  after another (decode with the ingest reader, ``prepare_sample``, the method, calibration: the
  replica's work without HTTP and Serve), and the method's forward pass alone;
- over HTTP at concurrency 1 and 16, with batching (``max_batch_size`` 16, ``batch_wait_ms`` 2)
  and without (``max_batch_size`` 1): two apps up at once (route prefixes ``/batched`` and
  ``/unbatched``), one replica per model with half a CPU (one torch thread).

For HTTP rows it also reports the replica's own ``Server-Timing`` medians: reading the body,
decoding + preprocessing, the batch queue + forward pass, and the replica's total; the rest of the
latency is Serve's proxy and the client.

Every measurement is taken in rounds: an in-process block, then each HTTP block in turn, four
times over, so a change of machine load (a shared CI box) hits all figures alike.

Goals: at concurrency 1 the served p50 is within 15 ms of the in-process p50; at concurrency 16
batched throughput is at least 1.5x unbatched. Prints a table and writes
``benchmarks/results/serve_latency.json``. Not a test.

    python benchmarks/serve_latency.py [--requests 200] [--out benchmarks/results/serve_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from medood import methods
from medood.platform import checkpoint as ckpt
from medood.platform import serve as S
from medood.platform.data.stream import InputSpec

RESULTS = Path(__file__).resolve().parent / "results" / "serve_latency.json"
CASES = {
    "2d-128": {"preset": "tiny", "overrides": {"image_size": 128}, "dataset": "digitanatomy", "size": 128},
    "3d-64": {"preset": "tiny3d", "overrides": {"image_size": 64}, "dataset": "synthetic-brain", "size": 64},
}
CONCURRENCY = (1, 16)
ROUNDS = 4
CPUS_PER_REPLICA = 0.5  # both apps (four model replicas) up at once on 2 CPUs; torch uses 1 thread
BATCHED = {"max_batch_size": 16, "batch_wait_ms": 2.0}
UNBATCHED = {"max_batch_size": 1, "batch_wait_ms": 0.0}
P50_GOAL_MS = 15.0
THROUGHPUT_GOAL = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=200, help="Requests per 2D measurement (3D: a third)."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medood-serve-bench-"))
    bodies, checkpoints = make_inputs(work)
    counts = {"2d-128": args.requests, "3d-64": max(48, args.requests // 3)}
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": _cpu_count(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "batched": BATCHED,
            "unbatched": UNBATCHED,
            "cpus_per_replica": CPUS_PER_REPLICA,
            "requests": counts,
            "rounds": ROUNDS,
        },
        "cases": {},
    }

    from ray import serve

    from medood.platform.jobs import ensure_ray

    ensure_ray()
    port = _free_port()  # one port for both apps: Serve keeps the HTTP options it was started with
    urls, applications = {}, []
    for mode, batching in (("batched", BATCHED), ("unbatched", UNBATCHED)):
        options = S.ServeOptions.from_args(
            {
                "checkpoints": [str(checkpoints[c]) for c in CASES],
                "names": list(CASES),
                "cpus_per_replica": CPUS_PER_REPLICA,
                "gpus_per_replica": 0,
                **batching,
            }
        )
        served = S.start_app(options, port=port, app_name=f"bench-{mode}", route_prefix=f"/{mode}")
        urls[mode] = served.url
        applications += served.applications
    with ThreadPoolExecutor(max_workers=max(CONCURRENCY)) as pool:
        for case, path in checkpoints.items():
            results["cases"][case] = measure_case(case, path, bodies[case], counts[case], urls, pool)
    for application in applications:
        serve.delete(application)
    serve.shutdown()
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["goals"] = check_goals(results["cases"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten to {args.out}")


def measure_case(
    case: str, path: Path, bodies: list[bytes], n: int, urls: dict[str, str], pool: ThreadPoolExecutor
) -> dict[str, Any]:
    """In-process and HTTP blocks taken in turns, so a change of machine load hits all alike."""
    server = S.ModelServer(str(path), case, {"max_batch_size": 16, "cpus": CPUS_PER_REPLICA, "gpus": 0})

    def pipeline(i: int) -> None:
        prepared = server.prepare(bodies[i % len(bodies)], None)
        raw, maps = server.forward(prepared.batch, keep_maps=False)
        server.respond(prepared, raw, maps, False)

    posters = {mode: _Poster(f"{url}/v1/models/{case}/score", bodies) for mode, url in urls.items()}
    for post in posters.values():  # warm-up: connections, batch queues, first-call costs
        list(pool.map(post, range(2 * max(CONCURRENCY))))
    _block(pipeline, 10, 1, None)
    blocks: dict[str, list[tuple[list[float], float]]] = {}
    per_round = max(1, n // ROUNDS)
    for _ in range(ROUNDS):
        blocks.setdefault("in_process", []).append(_block(pipeline, per_round, 1, None))
        for mode, post in posters.items():
            for concurrency in CONCURRENCY:
                count = per_round if concurrency == 1 else 2 * per_round
                post.key = f"{mode}_c{concurrency}"
                blocks.setdefault(post.key, []).append(_block(post, count, concurrency, pool))
    out: dict[str, Any] = {}
    for key, parts in blocks.items():
        latencies = [x for part, _ in parts for x in part]
        summary = _summary(
            latencies, sum(wall for _, wall in parts), 1 if key == "in_process" else int(key.split("_c")[1])
        )
        if key == "in_process":
            out["in_process"] = {"pipeline": summary}
        else:
            out[key] = {**summary, "server_timing_p50_ms": posters[key.split("_c")[0]].server_timing_p50(key)}
    # References: the method's forward pass alone, one request and 16 requests' samples at once.
    prepared = [server.prepare(b, None) for b in bodies]
    forward = _block(
        lambda i: server.forward(prepared[i % len(prepared)].batch, keep_maps=False), per_round, 1, None
    )
    out["in_process"]["forward"] = _summary(*forward, 1)
    stacked = {
        k: np.concatenate([prepared[i % len(prepared)].batch[k] for i in range(16)])
        for k in prepared[0].batch
    }
    batch16 = _block(lambda i: server.forward(stacked, keep_maps=False), max(8, per_round // 4), 1, None)
    summary = _summary(*batch16, 1)
    out["in_process"]["forward_batch16"] = {
        **summary,
        "samples_per_s": round(16 * summary["requests_per_s"], 1),
    }
    return out


def make_inputs(work: Path) -> tuple[dict[str, list[bytes]], dict[str, Path]]:
    """Generated files (as users would upload them) and one fresh checkpoint per case."""
    import torch

    from medood.platform.data.synthetic import synthesize

    bodies, checkpoints = {}, {}
    for case, spec in CASES.items():
        raw = work / case
        synthesize(
            spec["dataset"],
            raw,
            n_train=8 if spec["dataset"] == "digitanatomy" else 4,
            n_test=0,
            size=spec["size"],
            seed=0,
        )
        pattern = "*.png" if spec["dataset"] == "digitanatomy" else "*.nii.gz"
        bodies[case] = [p.read_bytes() for p in sorted(raw.rglob(pattern))]
        torch.manual_seed(0)
        method = methods.get("autoencoder").build(spec["preset"], **spec["overrides"]).eval()
        checkpoints[case] = work / f"{case}-ckpt"
        ckpt.save(
            checkpoints[case],
            method,
            calibration=ckpt.Calibration(),
            input_spec=InputSpec.from_config(method.config),
        )
    return bodies, checkpoints


class _Poster:
    """POSTs the i-th body and returns its latency; one keep-alive session per thread. Keeps the
    replica's ``Server-Timing`` figures (body, decode, model, total) per measurement ``key``."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.url, self.bodies = url, bodies
        self.key = "warm-up"
        self.timings: dict[str, list[dict[str, float]]] = {}
        self._local = threading.local()

    def __call__(self, i: int) -> float:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        start = time.perf_counter()
        response = session.post(self.url, data=self.bodies[i % len(self.bodies)], timeout=120)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}: {response.status_code} {response.text[:200]}")
        parts = (
            p.split(";dur=") for p in response.headers.get("Server-Timing", "").split(", ") if ";dur=" in p
        )
        self.timings.setdefault(self.key, []).append({name: float(value) for name, value in parts})
        return elapsed

    def server_timing_p50(self, key: str) -> dict[str, float]:
        rows = self.timings.get(key, [])
        names = sorted({name for row in rows for name in row})
        return {
            name: round(float(np.median([row[name] for row in rows if name in row])), 2) for name in names
        }


def _block(
    call: Callable[[int], Any], n: int, concurrency: int, pool: ThreadPoolExecutor | None
) -> tuple[list[float], float]:
    """n calls, one at a time or from ``concurrency`` pool threads: (latencies in s, wall time in s)."""

    def timed(i: int) -> float:
        t0 = time.perf_counter()
        call(i)
        return time.perf_counter() - t0

    started = time.perf_counter()
    if concurrency == 1 or pool is None:
        latencies = [timed(i) for i in range(n)]
    else:
        latencies = list(pool.map(timed, range(n)))
    return latencies, time.perf_counter() - started


def check_goals(cases: dict[str, Any]) -> dict[str, Any]:
    goals = {}
    for case, figures in cases.items():
        base = figures["in_process"]["pipeline"]["p50_ms"]
        gap = figures["batched_c1"]["p50_ms"] - base
        ratio = figures["batched_c16"]["requests_per_s"] / figures["unbatched_c16"]["requests_per_s"]
        goals[case] = {
            "c1_p50_over_in_process_ms": round(gap, 2),
            "c1_p50_goal_met": gap <= P50_GOAL_MS,
            "c16_batched_over_unbatched": round(ratio, 2),
            "c16_throughput_goal_met": ratio >= THROUGHPUT_GOAL,
        }
    return goals


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(
        f"\n{machine['cpus']} CPUs; load average before {machine['load_average_before']}, after {machine['load_average_after']}"
    )
    print(f"{'case':8} {'mode':26} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}")
    for case, figures in results["cases"].items():
        rows = [(f"in-process {k}", v) for k, v in figures["in_process"].items()]
        rows += [(k.replace("_c", ", concurrency "), v) for k, v in figures.items() if k != "in_process"]
        for label, v in rows:
            timing = v.get("server_timing_p50_ms")
            where = "  replica p50: " + ", ".join(f"{k} {t:.1f}" for k, t in timing.items()) if timing else ""
            print(
                f"{case:8} {label:26} {v['p50_ms']:9.2f} {v['p99_ms']:9.2f} {v['requests_per_s']:9.1f}{where}"
            )
    print()
    for case, goal in results["goals"].items():
        print(
            f"{case}: c=1 p50 - in-process p50 = {goal['c1_p50_over_in_process_ms']:.2f} ms "
            f"(goal <= {P50_GOAL_MS:g}: {'met' if goal['c1_p50_goal_met'] else 'NOT met'}); "
            f"c=16 batched / unbatched = {goal['c16_batched_over_unbatched']:.2f}x "
            f"(goal >= {THROUGHPUT_GOAL:g}x: {'met' if goal['c16_throughput_goal_met'] else 'NOT met'})"
        )


def _summary(latencies: list[float], wall: float, concurrency: int) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000.0
    return {
        "n": len(latencies),
        "concurrency": concurrency,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "requests_per_s": round(len(latencies) / wall, 2),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
