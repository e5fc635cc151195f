"""Test helpers that read a Ray Train run folder."""

from __future__ import annotations

import json
from pathlib import Path

from medood.platform.storage import Location


def latest_checkpoint_epoch(run: Path | Location) -> int | None:
    """The ``epoch`` metric of the latest checkpoint Ray Train registered in ``run`` (a folder or a
    ``storage.location``), or None before the first.

    A ``checkpoint_*`` folder appears before Ray Train registers it (its snapshot lists it); a run
    interrupted in between correctly starts again from scratch, so a test that interrupts "after the
    first checkpoint" waits for this.
    """
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    results = snapshot.get("checkpoint_results") or []
    epochs = [r.get("metrics", {}).get("epoch") for r in [snapshot.get("latest_checkpoint_result") or {}, *results]]
    epochs = [int(e) for e in epochs if e is not None]
    return max(epochs) if epochs else (len(results) or None)
