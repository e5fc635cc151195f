"""One line per epoch on the driver, from what a Ray Train run's workers report.

``progress_line`` turns one report into ``epoch 3/12  train  loss 0.041  val_auroc 0.870  4.1 s/epoch
eta 37 s``. ``ProgressPrinter`` prints those lines on the driver while ``TorchTrainer.fit`` runs: its
``callback`` is a Ray Train ``UserCallback`` whose ``after_report`` runs on the Train controller.

How a line gets from the controller to the driver: Ray Train attaches the controller to the driver's
node (``TorchTrainer.fit`` pins it there with a node label selector), so the callback appends each
line to a file on that node and a driver thread prints what is appended. An earlier version sent the
lines through a ``ray.util.queue.Queue``, which starts one more actor process per run (seconds of
CPU on a small machine); a Ray Client driver (``ray://``) is not on the controller's node, so there
the queue is still used.

This module imports nothing heavy (no torch, no methods): the controller unpickles the callback, and
everything the callback's module imports is imported in the controller process too.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Any

from ray.train import UserCallback

#: How often the driver looks for new lines.
POLL_S = 0.2


def progress_line(m: dict[str, Any]) -> str:
    """``epoch 3/12  train  loss 0.0410  val_auroc 0.870  4.1 s/epoch  eta 37 s`` from one report."""
    total = int(m.get("epochs_total") or 0)
    if total == 0:
        parts = ["fit (no training)"]
    else:
        parts = [f"epoch {int(m['epoch'])}/{total}", str(m.get("stage", ""))]
    if "train_loss" in m:
        parts.append(f"loss {m['train_loss']:.4g}")
    for key in ("val_loss", "val_auroc", "val_ap"):
        if key in m:
            parts.append(f"{key} {m[key]:.3f}" if key != "val_loss" else f"{key} {m[key]:.4g}")
    if "epoch_time_s" in m:
        parts.append(f"{m['epoch_time_s']:.1f} s/epoch")
        if total:
            parts.append(f"eta {max(0, total - int(m['epoch'])) * m['epoch_time_s']:.0f} s")
    return "  ".join(p for p in parts if p)


class ProgressCallback(UserCallback):
    """Runs on the Train controller: each report becomes a line in ``sink`` (a file path, or a Ray queue)."""

    def __init__(self, sink: str | Any) -> None:
        self.sink = sink

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        line = progress_line(metrics[0])
        if isinstance(self.sink, str):
            with open(self.sink, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        else:
            self.sink.put(line)


def on_client_driver() -> bool:
    """Whether this driver is a Ray Client (``ray://``): then it is not on the Train controller's node."""
    import ray

    return ray.util.client.ray.is_connected()


class ProgressPrinter:
    """Driver side: a thread printing, prefixed with the run's name, the lines the controller's callback writes."""

    def __init__(self, run_name: str) -> None:
        self.prefix = f"[{run_name}] "
        self._queue = None
        self._path: str | None = None
        if on_client_driver():
            from ray.util.queue import Queue

            self._queue = Queue(actor_options={"num_cpus": 0})
            self.callback = ProgressCallback(self._queue)
        else:
            fd, self._path = tempfile.mkstemp(prefix="medood-progress-", suffix=".txt")
            os.close(fd)
            self.callback = ProgressCallback(self._path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medood-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._queue is not None:
            self._run_queue()
            return
        assert self._path is not None
        with open(self._path, encoding="utf-8") as f:
            pending = ""
            while True:
                stopping = self._stop.is_set()  # read before the file, so the last lines are not lost
                pending += f.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    print(self.prefix + line, file=sys.stdout, flush=True)
                if stopping:
                    return
                self._stop.wait(POLL_S)

    def _run_queue(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = self._queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to print
                return
            print(self.prefix + line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._queue is not None:
            try:
                self._queue.shutdown()
            except Exception:  # noqa: BLE001 - best effort; Ray may already be down
                pass
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
