"""Sweeps (``medood.platform.tune``): plans are checked before Ray starts, results are written from the
trials, and the placement-group reaper works on a local Ray. Real sweeps (two trials at once, a killed
driver resumed without rerunning its finished trial) run on the two-node cluster of test_cluster.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from medood import methods
from medood.platform import checkpoint as ckpt
from medood.platform.data.ingest import ingest
from medood.platform.data.synthetic import synthesize
from medood.platform.tune import (
    RESULTS_CSV,
    RESULTS_MD,
    PlacementGroupReaper,
    SweepOptions,
    default_max_concurrent,
    make_plan,
    param_space,
    sweep,
    trial_options,
    trial_overrides,
    write_results,
)

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    layout = synthesize("digitanatomy", root / "raw", n_train=40, n_test=24, size=32, seed=0)
    ingest(layout, root / "raw", root / "shards", seed=0, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from medood.platform.jobs import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def fake_trial(trial_dir: Path, trial_id: str, setting: str, aurocs: list[float], *, status: str = "TERMINATED",
               error: str | None = None, with_ap: bool = False, seconds: float = 1.0) -> dict:
    """A trial as ``collect_trials`` returns it, with one checkpoint folder per reported epoch."""
    history = []
    for epoch, value in enumerate(aurocs, start=1):
        checkpoint = trial_dir / "run" / f"checkpoint_{epoch}"
        checkpoint.mkdir(parents=True)
        (checkpoint / ckpt.MODEL_FILE).write_bytes(b"weights")
        history.append({"epoch": epoch, "val_auroc": value, **({"val_ap": value / 2} if with_ap else {}),
                        "val_loss": 1 - value, "checkpoint_path": str(checkpoint), "time_this_iter_s": seconds})
    return {"trial": trial_dir.name, "trial_id": trial_id, "trial_dir": str(trial_dir), "tune_status": status,
            "config": {"setting": setting}, "history": history, "error": error}


# -- plans: no Ray ----------------------------------------------------------------------------------


def test_plan_runs_the_valid_settings_and_names_the_rest(digits, tmp_path):
    plan = make_plan(
        SweepOptions("squid", str(digits), ablation="patch_grid", preset="tiny", overrides={"epochs": "5"}), tmp_path / "s"
    )
    assert [s["label"] for s in plan["ablation"]["settings"]] == ["grid=1", "grid=2", "grid=4"]
    assert [s["label"] for s in plan["skipped"]] == ["grid=8"]  # 64-pixel tiny images cannot be cut 8 x 8
    assert "divisible" in plan["skipped"][0]["reason"]
    assert plan["max_t"] == 5 and (plan["metric"], plan["mode"]) == ("val_auroc", "max")
    assert plan["scheduler"] == "fifo"  # a paper's table trains every row to the end
    assert param_space(plan) == {"setting": {"grid_search": ["grid=1", "grid=2", "grid=4"]}}
    assert trial_overrides(plan, {"setting": "grid=4"}) == {"epochs": "5", "grid": 4}

    repeated = make_plan(
        SweepOptions("mae_classifier", str(digits), ablation="anomaly_measure", preset="tiny", samples=3,
                     overrides={"mae_epochs": "2"}),
        tmp_path / "m",
    )
    assert repeated["ablation"]["seeds"] == [0, 1, 2]
    assert param_space(repeated)["seed"] == {"grid_search": [0, 1, 2]}
    classifier_epochs = methods.get("mae_classifier").make_config("tiny").classifier_epochs
    assert repeated["max_t"] == 2 + classifier_epochs  # the classifier stage counts; MSE/MAE/SSIM rows skip it
    assert trial_overrides(repeated, {"setting": "SSIM", "seed": 2}) == {"mae_epochs": "2", "score": "ssim", "seed": 2}

    space = make_plan(SweepOptions("autoencoder", str(digits), preset="tiny", samples=4), tmp_path / "a")
    assert space["num_samples"] == 4 and space["max_t"] == methods.get("autoencoder").make_config("tiny").epochs
    assert space["scheduler"] == "asha"
    assert set(space["swept"]) == {"lr", "weight_decay", "batch_size", "num_res_units", "score"}
    assert trial_overrides(space, {"lr": 0.01, "score": "mae"}) == {"lr": 0.01, "score": "mae"}


def test_rows_that_train_on_auxiliary_images_need_their_shards(digits, tmp_path):
    without = make_plan(SweepOptions("dino_negatives", str(digits), ablation="neg_source", preset="tiny"), tmp_path / "n")
    assert [s["label"] for s in without["ablation"]["settings"]] == ["in-distribution"]
    assert [s["label"] for s in without["skipped"]] == ["auxiliary", "both"]
    assert all("--aux-data" in s["reason"] for s in without["skipped"]) and without["aux_data"] is None
    with_aux = make_plan(
        SweepOptions("dino_negatives", str(digits), ablation="neg_source", preset="tiny", aux_data=str(digits)), tmp_path / "a"
    )
    assert len(with_aux["ablation"]["settings"]) == 3 and with_aux["aux_data"] == str(digits)
    with pytest.raises(ValueError, match="auxiliary images.*--aux-data SHARDS"):
        make_plan(SweepOptions("dino_negatives", str(digits), preset="tiny", overrides={"neg_source": "both"}), tmp_path / "s")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ablation": "nope"}, "unknown ablation 'nope' for method 'squid'; known: patch_grid, top_k"),
        ({"ablation": "patch_grid", "overrides": {"grid": "2"}}, "--set grid clashes with what ablation"),
        ({"overrides": {"bogus": "1"}}, r"unknown config key\(s\) 'bogus'.*valid keys:"),
        ({"scheduler": "hyperband"}, "unknown scheduler 'hyperband'; known: asha, fifo"),
        ({"scheduler": "asha", "grace_period": 9, "overrides": {"epochs": "5"}}, "grace_period 9 exceeds the runs' 5 epochs"),
    ],
)
def test_bad_sweeps_fail_before_ray(digits, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_plan(SweepOptions("squid", str(digits), preset="tiny", **options), tmp_path / "s")


def test_metric_follows_the_trainable_when_val_has_no_labels(digits, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = json.loads((digits / "manifest.json").read_text())
    manifest["counts"]["val"] = {"normal": 5, "abnormal": 0, "unlabeled": 0, "total": 5}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    plan = make_plan(SweepOptions("autoencoder", str(shards), ablation="residual_units", preset="tiny"), tmp_path / "s")
    assert (plan["metric"], plan["mode"]) == ("val_loss", "min")
    manifest["counts"]["val"] = {"normal": 0, "abnormal": 0, "unlabeled": 0, "total": 0}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the val split is empty"):
        make_plan(SweepOptions("autoencoder", str(shards), preset="tiny"), tmp_path / "t")


def test_trials_run_one_at_a_time_on_two_cpus():
    plan = {"workers_per_trial": 1, "cpus_per_trial": 1, "gpus_per_trial": 0.0}
    assert default_max_concurrent(plan, {"CPU": 2.0}) == 1  # Train worker + Ray Data take both CPUs
    assert default_max_concurrent(plan, {"CPU": 16.0}) == 8
    assert default_max_concurrent({**plan, "gpus_per_trial": 0.5}, {"CPU": 16.0, "GPU": 1.0}) == 2
    assert default_max_concurrent({**plan, "cpus_per_trial": 4}, {"CPU": 2.0}) == 1


def test_trials_at_once_share_the_object_store(digits, tmp_path):
    """Each of the trials running at once may materialize into its share of Ray's object store only."""
    from medood.platform import storage

    plan = make_plan(SweepOptions("autoencoder", str(digits), ablation="residual_units", preset="tiny"), tmp_path / "s")
    setting = plan["ablation"]["settings"][1]["label"]
    shares = []
    for at_once in (1, 3):
        plan["max_concurrent"] = at_once
        options = trial_options(plan, {"setting": setting}, storage.location(tmp_path / "s" / "t0"))
        assert options.out == (storage.location(tmp_path / "s" / "t0") / "run").uri and options.progress is False
        assert options.overrides == trial_overrides(plan, {"setting": setting})
        shares.append(options.store_share)
    assert shares == [1.0, pytest.approx(1 / 3)]


def test_results_table_plots_and_best_from_trials(digits, tmp_path):
    out = tmp_path / "sweep"
    plan = make_plan(SweepOptions("squid", str(digits), ablation="extensive", preset="tiny", overrides={"epochs": 5}), out)
    out.mkdir()

    def trial(label: str, aurocs: list[float], status: str = "TERMINATED", error: str | None = None) -> dict:
        return fake_trial(out / f"t_{len(label)}_{label[:4]}", label, label, aurocs, status=status, error=error,
                          with_ap=True, seconds=10.0)

    resumed = trial("Soft Masked Shortcut", [0.6, 0.7, 0.72, 0.74, 0.75])
    # A resumed trial reports epoch 2 twice (before the interruption and again after): the last one counts.
    resumed["history"].insert(1, {**resumed["history"][1], "val_auroc": 0.99})
    trials = [
        trial("Full SQUID", [0.7, 0.8, 0.85, 0.83, 0.84]),
        trial("Convolution Layers", [0.5, 0.55]),  # stopped by ASHA after 2 of 5 epochs
        trial("Pixel-level In-painting", [], status="ERROR", error="FloatingPointError: non-finite training loss"),
        resumed,
    ]
    result = write_results(out, plan, trials)

    statuses = {r["setting"]: (r["status"], r["epochs_run"], r["best_epoch"]) for r in result.trials}
    assert statuses == {
        "Convolution Layers": ("stopped early", 2, 2),
        "Soft Masked Shortcut": ("complete", 5, 5),
        "Pixel-level In-painting": ("error", 0, None),
        "Full SQUID": ("complete", 5, 3),
    }
    assert result.trial_epochs == 12
    csv_lines = (out / RESULTS_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("trial,status,setting,aggregator,inpainting_level,shortcut,epochs_run,best_epoch")
    assert len(csv_lines) == 5

    table = (out / RESULTS_MD).read_text()
    assert "| Setting | AUROC | AP | epochs | paper AUROC |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Setting" not in line]
    assert [r.split(" | ")[0] for r in rows] == [  # the paper's order (Table 4.5)
        "| Convolution Layers", "| Soft Masked Shortcut", "| Pixel-level In-painting", "| Full SQUID"
    ]
    assert "| Full SQUID | 0.850 | 0.425 | 5 | 0.876 |" in table
    assert "FloatingPointError: non-finite training loss" in table

    best = json.loads((out / ckpt.BEST_FILE).read_text())
    assert best["setting"] == "Full SQUID" and best["epoch"] == 3 and best["metrics"]["val_auroc"] == 0.85
    assert best["config"]["grid"] == 2 and best["config"]["image_size"] == 64  # the resolved tiny config
    assert ckpt.resolve(out / ckpt.BEST_FILE) == Path(best["checkpoint"]) / ckpt.MODEL_FILE
    for name in ("val_auroc_by_setting.png", "curves.png"):
        assert (out / "plots" / name).read_bytes()[:4] == PNG


def test_an_interrupted_sweeps_table_says_so_and_its_folder_is_only_resumed(digits, tmp_path):
    """What an interrupted sweep (Ctrl+C: Tune returns with the running trials set back to PENDING)
    writes; a new sweep into its folder is refused before Ray starts. Resuming a sweep whose driver
    was killed runs for real in tests/test_cluster.py."""
    out = tmp_path / "sweep"
    plan = make_plan(SweepOptions("autoencoder", str(digits), ablation="residual_units", preset="tiny",
                                  overrides={"epochs": 3}), out)
    out.mkdir()
    trials = []
    for label, status, aurocs in (("done", "TERMINATED", [0.6, 0.7, 0.8]), ("paused", "PENDING", [0.5]),
                                  ("waiting", "PENDING", [])):
        trials.append(fake_trial(out / f"t_{label}", label, plan["ablation"]["settings"][0]["label"], aurocs,
                                 status=status))
    result = write_results(out, plan, trials, interrupted=True)
    assert result.interrupted
    assert sorted(r["status"] for r in result.trials) == ["complete", "pending", "unfinished"]
    assert f"**Interrupted**: resume with `medood tune --resume --out {out}`" in (out / RESULTS_MD).read_text()
    assert json.loads((out / ckpt.BEST_FILE).read_text())["epoch"] == 3  # the finished trial's best so far

    (out / "sweep.json").write_text(json.dumps(plan))
    options = SweepOptions("autoencoder", str(digits), ablation="residual_units", preset="tiny", out=str(out))
    with pytest.raises(ValueError, match="already holds a sweep; pass --resume"):
        sweep(options)
    with pytest.raises(FileNotFoundError, match="no interrupted sweep to resume"):
        sweep(SweepOptions("autoencoder", str(digits), out=str(tmp_path / "empty"), resume=True))


# -- a real sweep on a local Ray -------------------------------------------------------------------


@pytest.mark.ray
def test_reaper_frees_the_worker_groups_of_ended_trials_only(ray_local):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    def reserved(group) -> None:  # ready, and in the resource view the reaper reads
        ray.get(group.ready())
        deadline = time.monotonic() + 10
        while f"bundle_group_{group.id.hex()}" not in ray.cluster_resources() and time.monotonic() < deadline:
            time.sleep(0.1)

    def state(group) -> str:
        return ray.util.placement_group_table()[group.id.hex()]["state"]

    reaper = PlacementGroupReaper({"CPU": 1}, 1, {"memory": 2**20}, interval_s=3600, settle_s=0)
    reaper.start()
    groups = []
    try:
        groups.append(first := placement_group([{"memory": 2**20}]))  # a trial's driver ...
        groups.append(used := placement_group([{"CPU": 1}]))  # ... and its workers' group
        reserved(first)
        reserved(used)
        assert reaper.reap() == []  # the trial is alive
        remove_placement_group(first)  # Tune stops the trial; its workers' group stays behind
        groups.append(second := placement_group([{"memory": 2**20}]))  # the next trial ...
        groups.append(starting := placement_group([{"CPU": 1}]))  # ... whose workers are not placed yet
        reserved(second)
        reserved(starting)
        assert reaper.reap() == [used.id.hex()]  # older than every live trial, and empty
        assert state(used) == "REMOVED" and state(starting) == "CREATED"
        remove_placement_group(second)
        reaper.stop(final=True, timeout_s=10)  # after the sweep nothing of it is left
        assert state(starting) == "REMOVED"
    finally:
        reaper.stop(final=False)
        for group in groups:
            if state(group) != "REMOVED":
                remove_placement_group(group)


def test_sensitivity_is_a_metric_name_and_its_agreement_with_auroc_is_spearman(digits, tmp_path):
    from scipy.stats import spearmanr

    from medood.platform.tune import sensitivity_agreement

    plan = make_plan(SweepOptions("contrastive_mahalanobis", str(digits), ablation="covariance", preset="tiny",
                                  metric="sensitivity"), tmp_path / "s")
    assert (plan["metric"], plan["mode"]) == ("val_sensitivity", "max")
    rows = [{"val_sensitivity": s, "val_auroc": a} for s, a in [(0.6, 0.7), (0.55, 0.72), (0.8, 0.9), (0.5, 0.4)]]
    rho, p_value, n = sensitivity_agreement(rows + [{"val_sensitivity": None, "val_auroc": 0.5}])
    expected = spearmanr([0.6, 0.55, 0.8, 0.5], [0.7, 0.72, 0.9, 0.4])
    assert n == 4 and rho == pytest.approx(expected.statistic) and p_value == pytest.approx(expected.pvalue)
    assert sensitivity_agreement(rows[:2]) is None
