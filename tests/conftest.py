"""Shared test settings: no network tracking, and a private medood home (salt) per test session."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MEDOOD_HOME", tempfile.mkdtemp(prefix="medood-home-"))
