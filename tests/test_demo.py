"""The demo report leads with what was found, from the evaluation results (no Ray)."""

from __future__ import annotations

from medood.platform.demo import DEMO_RUNS, DemoRun, _render, findings


def result(auroc: float, per_type: dict[str, float], pixel_ap: float | None = None) -> dict:
    out = {
        "sample": {"n": 100, "n_abnormal": 50, "auroc": auroc, "auroc_ci95": (auroc - 0.05, auroc + 0.05), "ap": auroc,
                   "specificity": 0.9, "sensitivity": 0.8},
        "per_type": {k: {"n": 10, "auroc": v} for k, v in per_type.items()},
    }
    if pixel_ap is not None:
        out["pixel"] = {"ap": pixel_ap, "best_dice": 0.3}
    return out


def test_findings_name_the_best_learned_run_and_what_it_catches(tmp_path):
    rows = [
        {"run": DemoRun("floor", "pixel_mahalanobis", "digits", floor=True), "results": result(0.95, {}), "train_s": 1},
        {"run": DemoRun("ae", "autoencoder", "digits"), "results": result(0.70, {"flip": 0.9}), "train_s": 1},
        {"run": DemoRun("squid", "squid", "digits"), "results": result(0.88, {"flip": 0.95, "zero": 0.5, "missing": 0.7}), "train_s": 1},
        {"run": DemoRun("ae3d", "autoencoder", "brain", mood=True), "results": result(0.9, {"blob": 0.99}, 0.4), "train_s": 1},
        {"run": DemoRun("z", "voxel_zscore", "brain", floor=True), "results": result(0.8, {}, 0.1), "train_s": 1},
        # Ranks cases best but maps worse than ae3d: the sentence names both.
        {"run": DemoRun("slices", "autoencoder", "brain2", mood=True), "results": result(0.95, {}, 0.05), "train_s": 1},
        {"run": DemoRun("ae3d2", "autoencoder", "brain2", mood=True), "results": result(0.85, {}, 0.6), "train_s": 1},
        {"run": DemoRun("z2", "voxel_zscore", "brain2", floor=True), "results": result(0.8, {}, 0.4), "train_s": 1},
    ]
    for row in rows:
        row["eval_dir"] = tmp_path / "eval" / row["run"].name
    found = findings(rows)
    assert found["digits"]["run"] == "squid"  # the floor never counts as the best learned method
    assert found["digits"]["caught"] == ["flip"] and found["digits"]["missed"] == ["zero"]
    assert found["digits"]["floor_auroc"] == 0.95
    assert found["brain"]["pixel_ap"] == 0.4 and found["brain"]["floor_pixel_ap"] == 0.1
    report = _render(rows, tmp_path, 120.0)
    lines = report.splitlines()
    assert lines[2] == "## What was found"
    assert lines[4].startswith("- **digits**: squid separates abnormal from normal test cases with AUROC 0.88")
    assert "Caught (type AUROC >= 0.8): flip; missed (< 0.65): zero." in lines[4]
    assert "voxel AP 0.400 (floor 0.100)." in lines[5]
    assert found["brain2"]["run"] == "slices" and found["brain2"]["maps_run"] == "ae3d2"
    assert lines[6].startswith("- **brain2**: slices separates abnormal from normal test cases with AUROC 0.95")
    assert lines[6].endswith("The best anomaly maps are ae3d2's: voxel AP 0.600 (floor 0.400).")


def test_every_demo_dataset_has_a_floor_and_a_learned_run():
    datasets = {r.dataset for r in DEMO_RUNS}
    for dataset in datasets:
        runs = [r for r in DEMO_RUNS if r.dataset == dataset]
        assert any(r.floor for r in runs) and any(not r.floor for r in runs), dataset
    assert any(r.mood for r in DEMO_RUNS if not r.floor)
