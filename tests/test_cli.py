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


def medood_here(capsys, *args: str) -> tuple[int, str, str]:
    """``medood *args`` in this process (for commands that fail or finish before Ray starts): exit code, stdout, stderr."""
    from medood.platform import cli

    argv = sys.argv
    sys.argv = ["medood", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synth_train_evaluate(tmp_path, capsys):
    shards = tmp_path / "shards"
    # The data commands run in this process (they start no Ray); train and evaluate as a user runs them.
    code, out, _ = medood_here(
        capsys, "data", "synth", "digitanatomy", str(tmp_path / "raw"), "--n-train", "40", "--n-test", "30",
        "--size", "32", "--shards", str(shards), "--no-progress",
    )
    assert code == 0 and "files seen" in out
    code, out, _ = medood_here(capsys, "data", "info", str(shards), "--json")
    counts = json.loads(out)["counts"]
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


def test_methods_lists_fields_and_defaults(capsys):
    code, out, _ = medood_here(capsys, "methods", "--json")
    assert code == 0
    listed = json.loads(out)
    assert {"autoencoder", "squid", "mae_classifier"} <= set(listed)
    assert listed["autoencoder"]["fields"]["score"] == {"paper": "mse", "tiny": "mse"}


def test_usage_errors_name_the_valid_values(tmp_path, capsys):
    code, _, stderr = medood_here(capsys, "train", "--method", "nope", "--data", str(tmp_path))
    assert code == 2
    assert "unknown method 'nope'; known:" in stderr and "autoencoder" in stderr
    code, _, stderr = medood_here(capsys, "train", "--method", "autoencoder", "--data", str(tmp_path), "--set", "bogus=1")
    assert code == 2 and "unknown config key(s) 'bogus'" in stderr
    code, out, stderr = medood_here(capsys, "ingest", "--layout", "moood", str(tmp_path), str(tmp_path / "o"))
    assert code == 2 and "unknown layout 'moood'; known:" in stderr + out
    # auxiliary images: refused where the method reads none, asked for where it does
    code, _, stderr = medood_here(capsys, "train", "--method", "autoencoder", "--data", str(tmp_path),
                                  "--aux-data", str(tmp_path))
    assert code == 2 and "--aux-data: autoencoder with these settings trains on no auxiliary images" in stderr
    code, _, stderr = medood_here(capsys, "train", "--method", "dino_negatives", "--data", str(tmp_path),
                                  "--set", "neg_source=both")
    assert code == 2 and "name their shard folder with --aux-data SHARDS" in " ".join(stderr.split())
