"""Integration: the Ray Train trainable and evaluation (one local Ray); resume after a lost node is in test_cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medood.platform import checkpoint as ckpt
from medood.platform.data.ingest import ingest
from medood.platform.data.synthetic import synthesize
from medood.platform.evaluate import evaluate, score_split
from medood.platform.train import TrainOptions, train

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from medood.platform.jobs import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    layout = synthesize("digitanatomy", root / "raw", n_train=48, n_test=40, size=32, seed=0)
    ingest(layout, root / "raw", root / "shards", seed=0, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain")
    layout = synthesize("synthetic-brain", root / "raw", n_train=6, n_test=10, size=24, seed=0)
    ingest(layout, root / "raw", root / "shards", seed=0, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def digit_run(ray_local, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ae"
    options = TrainOptions(
        method="autoencoder", data=str(digits), out=str(out), preset="tiny",
        overrides={"epochs": 2, "image_size": 32}, wandb=False,
    )
    return train(options)


def test_train_reports_every_epoch_and_keeps_the_best(digit_run):
    assert [h["epoch"] for h in digit_run.history] == [1, 2]
    for h in digit_run.history:
        assert {"train_loss", "val_loss", "val_auroc", "val_ap", "val_threshold"} <= set(h)
    assert digit_run.metric == "val_auroc"
    best = max(h["val_auroc"] for h in digit_run.history)
    assert digit_run.best_metrics["val_auroc"] == pytest.approx(best)
    run_json = json.loads((Path(digit_run.path) / "run.json").read_text())
    assert run_json["checkpoint"] == digit_run.best_checkpoint

    payload = torch.load(Path(digit_run.best_checkpoint) / "model.pt", weights_only=True)
    assert payload["method"] == "autoencoder" and payload["config"]["epochs"] == 2
    assert payload["calibration"]["fitted_on"] > 0  # fitted on normal training data
    model = ckpt.load(digit_run.path)  # a run folder resolves to its best checkpoint
    assert model.path == str(Path(digit_run.best_checkpoint) / "model.pt")


def test_unknown_method_and_key_fail_before_ray_work(digits, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'autoencodr'; known: .*autoencoder"):
        train(TrainOptions(method="autoencodr", data=str(digits), out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="unknown config key.*'lr_'"):
        train(TrainOptions(method="autoencoder", data=str(digits), out=str(tmp_path / "x"), overrides={"lr_": "1"}))


def test_evaluate_matches_sklearn_and_writes_report(digit_run, digits, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(digit_run.path, digits, split="test", out=out, n_bootstrap=100)
    for name in ("report.md", "metrics.json", "roc.png", "pr.png"):
        assert (out / name).is_file(), name
    assert any(out.glob("overlay_abnormal_*.png")) and any(out.glob("overlay_normal_*.png"))
    model = ckpt.load(digit_run.path)
    scored = score_split(model, digits, "test")
    y, s = scored.arrays()
    assert set(y) == {0, 1}
    sample = results["sample"]
    assert sample["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert sample["ap"] == pytest.approx(skm.average_precision_score(y, s))
    t = results["threshold"]
    assert sample["f1"] == pytest.approx(skm.f1_score(y, s >= t))
    assert sample["accuracy"] == pytest.approx(skm.accuracy_score(y, s >= t))
    assert results["pixel"]["n_cases"] > 0 and 0 <= results["pixel"]["ap"] <= 1
    assert "| auroc |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "method, preset, overrides, data_options",
    [
        ("autoencoder", "tiny", {"epochs": 1, "image_size": 16}, {"slice_axis": 2}),  # 2D on 3D: slices stacked
        # A 3D method on whole volumes (maps in model space, resized back to the input's), and the
        # training-free path of the trainer (fitted, validated and checkpointed once), in one run.
        ("voxel_zscore", "tiny", {"image_size": 16}, {}),
    ],
    ids=["2d-slices", "3d-floor"],
)
def test_mood_submission_and_the_reports_voxel_ap_agree(
    ray_local, brain, tmp_path, capsys, method, preset, overrides, data_options
):
    run = train(
        TrainOptions(
            method=method, data=str(brain), out=str(tmp_path / "run"), preset=preset,
            overrides=overrides, data_options=data_options, wandb=False,
        )
    )
    printed = capsys.readouterr().out
    if method == "voxel_zscore":
        assert [h["epoch"] for h in run.history] == [0] and "fit (no training)" in printed
    else:
        assert "[run] epoch 1/1  train  loss " in printed and "val_auroc" in printed and "eta 0 s" in printed
    assert "INFO" not in printed and "WARNING" not in printed
    mood = tmp_path / "mood"
    results = evaluate(run.path, brain, split="test", out=tmp_path / "eval", mood_dir=mood, n_bootstrap=50)
    pixel = sorted((mood / "pixel").glob("*.nii.gz"))
    sample = sorted((mood / "sample").glob("*.nii.gz.txt"))
    assert pixel and len(pixel) == len(sample) == results["case" if data_options else "sample"]["n"]
    raw = brain.parent / "raw"
    masks, maps = [], []
    for path in pixel:
        prediction = nib.load(path)
        source = nib.as_closest_canonical(nib.load(raw / "toy" / path.name))
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        values = np.asarray(prediction.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0
        label_file = raw / "toy_label" / "pixel" / path.name
        truth = np.asarray(nib.as_closest_canonical(nib.load(label_file)).dataobj) if label_file.exists() else None
        masks.append(np.zeros(values.shape, bool) if truth is None else truth > 0)
        maps.append(values)
    for path in sample:
        assert 0.0 <= float(path.read_text()) <= 1.0
    # The challenge's voxel AP: every voxel of every case, from the files written, as MOOD scores them.
    expected = skm.average_precision_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert results["pixel"]["ap"] == pytest.approx(expected, rel=1e-5)
    assert results["pixel"]["n_voxels"] == sum(m.size for m in masks)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"| AP | {results['pixel']['ap']:.4f} |" in report
    # per anomaly type: every abnormal test case's type from the generator, each against all normals
    generated = json.loads((raw / "generation.json").read_text())
    kinds = {c["anomaly"] for c in generated["cases"] if c.get("role") == "test" and c["label"] == 1}
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert rows[0] == "id,label,anomaly,score,predicted_abnormal" and len(rows) == len(sample) + 1
    test_types = [r.split(",")[2] for r in rows[1:] if r.split(",")[1] == "1"]
    assert test_types and set(test_types) <= kinds  # the test split holds some of the generated types
    assert {k: v["n"] for k, v in results["per_type"].items()} == {k: test_types.count(k) for k in set(test_types)}
    assert "## Per anomaly type" in report


def test_negatives_drawn_from_an_auxiliary_shard_folder(ray_local, digits, brain, tmp_path):
    """dino_negatives with neg_source=aux trains on images of another ingested set (here brain slices for
    digit images): its training step refuses to run without them, so a finished run proves they arrived."""
    overrides = {"epochs": 1, "image_size": 32, "local_size": 16, "batch_size": 16, "neg_source": "aux"}
    with pytest.raises(ValueError, match="--aux-data SHARDS"):
        train(TrainOptions(method="dino_negatives", data=str(digits), out=str(tmp_path / "x"), preset="tiny",
                           overrides=overrides, wandb=False))
    run = train(TrainOptions(method="dino_negatives", data=str(digits), out=str(tmp_path / "aux"), preset="tiny",
                             overrides=overrides, wandb=False, aux_data=str(brain)))
    assert [h["epoch"] for h in run.history] == [1] and math.isfinite(run.history[0]["train_loss"])
    assert json.loads((Path(run.path) / "run.json").read_text())["aux_data"] == str(brain)


def test_auxiliary_images_come_n_at_a_time_round_the_set():
    from medood.platform.train import _AuxiliaryImages

    class Shard:  # Ray Data's DataIterator, as far as _AuxiliaryImages uses it
        def __init__(self, n: int) -> None:
            self.images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
            self.passes = 0

        def iter_batches(self, batch_size, **_):
            self.passes += 1
            for start in range(0, len(self.images), batch_size):
                chunk = self.images[start:start + batch_size]
                yield {"image": chunk, "label": np.zeros(len(chunk), np.int64), "id": [str(i) for i in chunk.flat]}

    shard = Shard(7)
    aux = _AuxiliaryImages(shard, 3, torch.device("cpu"), seed=0)
    taken = [aux.take(n) for n in (4, 4, 4, 2)]
    assert [len(t) for t in taken] == [4, 4, 4, 2]
    assert torch.cat(taken).flatten().tolist() == [*range(7), *range(7)]  # every image once per pass, in turn
    assert shard.passes == 2
    with pytest.raises(ValueError, match="has no images"):
        _AuxiliaryImages(Shard(0), 3, torch.device("cpu"), seed=0).take(1)


def test_streaming_slices_patches_and_raw_arrays(ray_local, brain):
    from medood.platform.data.stream import InputSpec, read_split, split_count

    n_test, n_train = split_count(brain, "test"), split_count(brain, "train")
    slices = read_split(brain, "test", InputSpec(spatial_dims=2, image_size=16, slice_axis=2), batch_size=2)
    seen_cases, n_slices = set(), 0
    for batch in slices.iter_batches(batch_size=32, batch_format="numpy"):
        assert batch["image"].shape[1:] == (1, 16, 16) and batch["image"].dtype == np.float32
        seen_cases |= {i.split("#")[0] for i in batch["id"]}
        n_slices += len(batch["id"])
    assert len(seen_cases) == n_test and n_slices > n_test
    patches = read_split(
        brain, "train", InputSpec(spatial_dims=3, image_size=16, patch_size=8, patches_per_volume=2), training=True
    )
    shapes = [b["image"].shape for b in patches.iter_batches(batch_size=4, batch_format="numpy")]
    assert sum(s[0] for s in shapes) == 2 * n_train and all(s[1:] == (1, 8, 8, 8) for s in shapes)
    raw = read_split(brain, "val", None)
    assert all(r["image"].shape == (24, 24, 24) for r in raw.iter_rows())


def test_two_workers_split_the_data_and_run_the_stage_hooks(ray_local, tmp_path):
    """``self_taught`` with two CPU workers on shards ingested with known anomalies in train: Ray Data splits
    the train split between the workers, the stage hooks fit k-means centres from all of it and prune on
    summed counts (test_stage_hooks.py checks the same hooks in two gloo processes without Ray), and the
    best checkpoint comes from the last stage. Gradient averaging itself is test_ddp.py's."""
    from medood.platform.data.stream import split_count

    layout = synthesize("digitanatomy", tmp_path / "raw", n_train=40, n_test=24, size=32, seed=0)
    ingest(layout, tmp_path / "raw", tmp_path / "shards", seed=0, train_anomalies=0.3, progress=False)
    small = {
        "image_size": 32, "widths": (8, 8, 16, 16), "head": (16, 8), "n_spheres": 3, "gamma": 0.3,
        "pretext_epochs": 1, "ad_epochs": 1, "batch_size": 8,
    }
    result = train(
        TrainOptions(
            method="self_taught", data=str(tmp_path / "shards"), out=str(tmp_path / "run"), preset="tiny",
            overrides=small, workers=2, cpus_per_worker=0.5, wandb=False, progress=False,
            # A metric on which the pretext stage wins (its InfoNCE loss is far above the sphere
            # loss): the best checkpoint must still come from the last stage, the method trained.
            metric="val_loss", mode="max",
        )
    )
    assert [h["stage"] for h in result.history] == ["pretext", "ad"]
    pretext, ad = result.history
    # rank 0 saw about half of the train split (Ray Data's streaming split)
    assert 0 < ad["train_samples"] < split_count(tmp_path / "shards", "train")
    assert pretext["val_loss"] > ad["val_loss"]
    assert result.best_metrics["stage"] == "ad" and result.best_metrics["epoch"] == ad["epoch"]
    assert ckpt.load(result.best_checkpoint).method.centers_ready
    assert 0 < ad["train_labelled_fraction"] < 0.5  # known anomalies, counted over both workers
    assert np.isfinite(ad["train_loss"]) and "val_auroc" in ad
    model = ckpt.load(result.path).method
    assert bool(model.centers_ready) and 1 <= int(model.active.sum()) <= 3


def test_a_client_driver_gets_its_progress_lines_through_a_ray_queue(ray_local, monkeypatch, capsys):
    """A Ray Client (ray://) driver is not on the Train controller's node, so the controller's callback puts
    each line on a Ray queue (an actor) instead of a local file; the driver prints them all, in order."""
    from medood.platform import progress

    monkeypatch.setattr(progress, "on_client_driver", lambda: True)
    printer = progress.ProgressPrinter("remote")
    assert printer._path is None and not isinstance(printer.callback.sink, str)
    reports = [{"epoch": e, "epochs_total": 3, "stage": "train", "train_loss": 1.0 / e, "epoch_time_s": 1.0} for e in (1, 2, 3)]
    for m in reports:
        printer.callback.after_report(None, [m], None)
    printer.close()  # drains the queue before it stops
    assert capsys.readouterr().out.splitlines() == [f"[remote] {progress.progress_line(m)}" for m in reports]


def test_training_epochs_draw_new_patches_every_epoch_and_one_worker_keeps_its_split(ray_local, brain):
    """3D random patches are drawn per epoch from (seed, epoch, case): each epoch sees new ones, and a
    single worker's in-memory copy of the preprocessed split (epochs after the first) draws exactly what
    streaming it through Ray Data again would."""
    from medood.platform.data.stream import InputSpec, split_count, training_datasets
    from medood.platform.train import _TrainingEpochs

    spec = InputSpec(spatial_dims=3, image_size=16, patch_size=8)

    def epochs(cache: bool) -> tuple[_TrainingEpochs, list[dict[str, torch.Tensor]]]:
        datasets, materialized = training_datasets(brain, spec, batch_size=2, with_val=False)
        assert materialized == {"train"}
        data = datasets["train"]
        batches = _TrainingEpochs(data.iterator(), spec, 3, torch.device("cpu"), seed=0, shuffle_buffer=0, cache=cache)
        return batches, [{i: x for b in batches.epoch(e) for i, x in zip(b["id"], b["image"])} for e in range(3)]

    cached, drawn = epochs(True)
    assert cached.rows is not None and len(cached.rows["id"]) == split_count(brain, "train")
    assert all(len(d) == split_count(brain, "train") for d in drawn)  # every case once per epoch
    assert all(x.shape == (1, 8, 8, 8) for x in drawn[0].values())
    assert sum(not torch.equal(drawn[0][i], drawn[1][i]) for i in drawn[0]) >= len(drawn[0]) // 2  # new patches
    streamed, again = epochs(False)
    assert streamed.rows is None
    for a, b in zip(drawn, again):
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_a_split_over_its_share_of_the_object_store_streams_the_same_rows(ray_local, brain):
    """``budget_fraction`` (a run's or a sweep trial's share of the object store): a split whose
    preprocessed size is over it is not materialized, and streaming it gives the same preprocessed rows."""
    import ray

    from medood.platform.data.stream import InputSpec, preprocessed_bytes, training_datasets

    spec = InputSpec(spatial_dims=3, image_size=16)
    kept, materialized = training_datasets(brain, spec, batch_size=2)
    assert materialized == {"train", "val"}
    store = ray.cluster_resources()["object_store_memory"]
    # room for the train split only: val (the next one) streams
    fraction = (preprocessed_bytes(brain, "train", spec) + 1) / store
    partly, materialized = training_datasets(brain, spec, batch_size=2, budget_fraction=fraction)
    assert materialized == {"train"}
    streamed, materialized = training_datasets(brain, spec, batch_size=2, budget_fraction=1e-9)
    assert materialized == set()

    def rows(dataset) -> dict[str, np.ndarray]:
        return {i: x for b in dataset.iter_batches(batch_size=4, batch_format="numpy") for i, x in zip(b["id"], b["image"])}

    for split in ("train", "val"):
        want = rows(kept[split])
        for other in (partly, streamed):
            got = rows(other[split])
            assert got.keys() == want.keys() and all(np.array_equal(got[i], want[i]) for i in want)
