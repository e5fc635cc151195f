"""End to end: the `medood` command as a user runs it, on tiny generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def medood(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "medood.platform.cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medood {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_synth_train_evaluate(tmp_path):
    shards = tmp_path / "shards"
    synth = medood(
        "data", "synth", "digitanatomy", str(tmp_path / "raw"), "--n-train", "40", "--n-test", "30",
        "--size", "32", "--shards", str(shards), "--no-progress",
    )
    assert "files seen" in synth.stdout
    info = medood("data", "info", str(shards), "--json")
    counts = json.loads(info.stdout)["counts"]
    assert counts["train"]["abnormal"] == 0 and counts["test"]["abnormal"] > 0 and counts["val"]["abnormal"] > 0

    run = tmp_path / "runs" / "ae"
    medood(
        "train", "--method", "autoencoder", "--data", str(shards), "--preset", "tiny", "--set", "epochs=1",
        "--set", "image_size=32", "--out", str(run), cwd=tmp_path,
    )
    assert json.loads((run / "run.json").read_text())["checkpoint"]
    assert list(run.glob("wandb/offline-run-*")), "W&B logs offline by default"

    out = tmp_path / "eval"
    evaluation = medood("evaluate", str(run), "--data", str(shards), "--out", str(out), "--bootstrap", "50")
    assert "sample_auroc" in evaluation.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["sample"]["auroc"] <= 1.0
    assert (out / "report.md").is_file() and (out / "roc.png").is_file()


def test_methods_lists_fields_and_defaults():
    listed = json.loads(medood("methods", "--json").stdout)
    assert {"autoencoder", "squid", "mae_classifier"} <= set(listed)
    assert listed["autoencoder"]["fields"]["score"] == {"paper": "mse", "tiny": "mse"}


def test_usage_errors_name_the_valid_values(tmp_path):
    proc = medood("train", "--method", "nope", "--data", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "unknown method 'nope'; known:" in proc.stderr and "autoencoder" in proc.stderr
    proc = medood("train", "--method", "autoencoder", "--data", str(tmp_path), "--set", "bogus=1", check=False)
    assert proc.returncode == 2 and "unknown config key(s) 'bogus'" in proc.stderr
    proc = medood("ingest", "--layout", "moood", str(tmp_path), str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "unknown layout 'moood'; known:" in proc.stderr + proc.stdout
