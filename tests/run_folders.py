"""Test helpers that read a Ray Train run folder."""

from __future__ import annotations

import json
from pathlib import Path


def checkpoint_registered(run: Path) -> bool:
    """Ray Train has registered a checkpoint of the run in ``run`` (its snapshot lists one).

    A ``checkpoint_*`` folder appears before Ray Train registers it; a run interrupted in between
    correctly starts again from scratch, so a test that interrupts "after the first checkpoint" waits
    for this.
    """
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("checkpoint_results"))
