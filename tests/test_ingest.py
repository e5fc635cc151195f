"""Ingest: shards, manifest, group-level splits, quarantine, reconciliation, re-runs, info and the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from medood.platform.data.cli import data_app, ingest_command
from medood.platform.data.ingest import IngestError, assign_splits, info, info_tables, ingest
from medood.platform.data.layouts import Case, CaseRows
from medood.platform.data.schema import SHARD_SCHEMA, decode_affine, decode_image, decode_mask


@pytest.fixture(autouse=True)
def data_salt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the secret salt file of these tests out of the real ~/.medood."""
    monkeypatch.setenv("MEDOOD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDOOD_SALT", raising=False)
    return tmp_path / "home"


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def _gray(seed: int, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, (side, side), dtype=np.uint8)


def make_folder(root: Path, normals: int = 12, abnormals: int = 6) -> Path:
    """Patients p00..: a normal image each; the first `abnormals` also have an abnormal one + mask."""
    for p in range(normals):
        _png(root / "normal" / f"p{p:02d}" / "img.png", _gray(p))
    for p in range(abnormals):
        _png(root / "abnormal" / f"p{p:02d}" / "img.png", _gray(100 + p))
        mask = np.zeros((16, 16), np.uint8)
        mask[p : p + 3, 2:6] = 255
        _png(root / "masks" / f"p{p:02d}" / "img.png", mask)
    for p in range(normals, normals + 4):  # patients with an abnormal image only
        _png(root / "abnormal" / f"p{p:02d}" / "img.png", _gray(200 + p))
    return root


def read_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for shard in sorted(out.glob("part-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    return rows


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


# --- shards and manifest -----------------------------------------------------------------------------


def test_folder_ingest_writes_schema_rows_manifest_and_reconciles(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    (src / "normal" / "p03" / "broken.png").write_bytes(_png(tmp_path / "x.png", _gray(7)).read_bytes()[:60])
    (src / "normal" / "p04" / "notes.txt").write_text("seen, unsupported")
    (src / ".DS_Store").write_bytes(b"\x00\x01")
    (src / "README.md").write_text("not an image")

    report = ingest("folder", src, tmp_path / "out", salt="pepper-1234", progress=False)

    out = tmp_path / "out"
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    assert pq.ParquetFile(out / "part-00000.parquet").metadata.row_group(0).column(8).compression == "ZSTD"
    rows = read_rows(out)
    # 6 patients have a normal and an abnormal image; the 4 of them dealt into train keep only the normal
    rule = "abnormal in a train group (train holds normal cases; see train_anomalies)"
    assert report.reconciliation["files_excluded"] == {rule: 4 + 4}  # the abnormal images and their masks
    assert len(rows) == report.rows == 12 + 6 + 4 - 4
    by_id = {row["id"]: row for row in rows}
    normal = by_id["normal/p05/img.png"]
    np.testing.assert_array_equal(decode_image(normal), _gray(5).astype(np.float32))
    assert normal["dtype"] == "uint8" and normal["shape"] == [16, 16] and normal["label"] == 0
    abnormal = by_id["abnormal/p02/img.png"]
    assert abnormal["label"] == 1 and decode_mask(abnormal).sum() == 12
    assert len(normal["sha256"]) == 64 and normal["dataset"] == "folder"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["layout"] == "folder"
    assert manifest["params"]["splits"] == [0.8, 0.1, 0.1] and manifest["params"]["seed"] == 0
    assert manifest["params"]["salt"]["source"] == "user" and "pepper" not in json.dumps(manifest)
    assert [s["rows"] for s in manifest["shards"]] == [len(rows)]
    assert sum(c["total"] for c in manifest["counts"].values()) == len(rows)
    assert {q["path"] for q in manifest["quarantine"]} == {"normal/p03/broken.png", "normal/p04/notes.txt"}
    assert any("unsupported file type '.txt'" in q["reason"] for q in manifest["quarantine"])
    rec = manifest["reconciliation"]
    assert (rec["files_seen"], rec["files_in_rows"], rec["files_quarantined"]) == (22, 20, 2)
    assert rec["balanced"] and rec["other_files"] == 2 and rec["label_files"] == 0
    assert "files seen = files in rows + files quarantined: 22 = 20 + 2" in report.summary()


def test_shards_are_bounded_renamed_and_stale_ones_removed(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    small = ingest("folder", src, out, salt="s", max_shard_bytes=2000, progress=False)
    assert len(small.shards) > 5
    assert all(s["rows"] <= 3 for s in small.shards)  # 256 B of image + overhead per row, 2000 B per shard
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [s["path"] for s in small.shards]
    for shard in small.shards:
        data = (out / shard["path"]).read_bytes()
        import hashlib

        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]

    big = ingest("folder", src, out, salt="s", progress=False)
    assert [s["path"] for s in big.shards] == ["part-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet"]
    assert len(read_rows(out)) == big.rows == small.rows


def test_rerun_is_up_to_date_and_rewrites_are_byte_identical(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    first = ingest("folder", src, out, salt="s", max_shard_bytes=3000, progress=False)
    before = shard_bytes(out)
    manifest_before = (out / "manifest.json").read_bytes()
    stamp = (out / "manifest.json").stat().st_mtime_ns

    again = ingest("folder", src, out, salt="s", max_shard_bytes=3000, progress=False)
    assert again.up_to_date and not first.up_to_date
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert again.summary().startswith("up to date")

    touched = src / "normal" / "p00" / "img.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    rewritten = ingest("folder", src, out, salt="s", max_shard_bytes=3000, progress=False)
    assert not rewritten.up_to_date
    assert shard_bytes(out) == before
    assert json.loads((out / "manifest.json").read_bytes())["shards"] == json.loads(manifest_before)["shards"]

    other_seed = ingest("folder", src, out, salt="s", seed=1, max_shard_bytes=3000, progress=False)
    assert not other_seed.up_to_date


# --- splits ------------------------------------------------------------------------------------------


def _split_by_group(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    splits: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits[row["group"]].add(row["split"])
    return splits


def test_splits_are_group_level_with_normal_only_train_and_both_labels_in_val_and_test(
    tmp_path: Path,
) -> None:
    src = make_folder(tmp_path / "src")
    report = ingest("folder", src, tmp_path / "out", salt="s", progress=False)
    rows = read_rows(tmp_path / "out")

    assert all(len(splits) == 1 for splits in _split_by_group(rows).values())
    assert {row["label"] for row in rows if row["split"] == "train"} == {0}
    for split in ("val", "test"):
        assert {row["label"] for row in rows if row["split"] == split} == {0, 1}
    # mixed patients dealt into train lose their abnormal image by rule (not a file error)
    dropped = report.manifest["rows_dropped_by_rule"]
    excluded = report.reconciliation["files_excluded"]
    assert not dropped and sum(excluded.values()) >= 1
    assert report.reconciliation["balanced"]


def test_train_anomalies_moves_abnormal_groups_into_train(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", normals=10, abnormals=0)
    for p in range(10, 20):
        _png(src / "abnormal" / f"p{p:02d}" / "img.png", _gray(p))
    report = ingest("folder", src, tmp_path / "out", salt="s", train_anomalies=0.3, progress=False)
    assert report.counts["train"]["abnormal"] == 3
    assert report.counts["val"]["abnormal"] >= 1 and report.counts["test"]["abnormal"] >= 1
    assert report.manifest["params"]["train_anomalies"] == 0.3


def _case(case_id: str, group: str, label: int | None, pool: str | None = None, mixed: bool = False) -> Case:
    return Case(case_id, group, [], lambda: CaseRows([]), label=label, mixed=mixed, pool=pool)


def test_assign_splits_is_deterministic_proportional_and_respects_pools() -> None:
    cases = [_case(f"n{i}", f"g{i}", 0) for i in range(100)] + [_case(f"a{i}", f"h{i}", 1) for i in range(20)]
    first = assign_splits(cases, seed=0)
    assert first == assign_splits(list(reversed(cases)), seed=0)
    assert first != assign_splits(cases, seed=1)
    normal_splits = [first[f"n{i}"][0] for i in range(100)]
    assert [normal_splits.count(s) for s in ("train", "val", "test")] == [80, 10, 10]
    abnormal_splits = [first[f"a{i}"][0] for i in range(20)]
    assert [abnormal_splits.count(s) for s in ("train", "val", "test")] == [0, 10, 10]

    official = [_case("t", "x", 0, "train"), _case("v0", "y", 0, "valtest"), _case("v1", "z", 1, "valtest")]
    official += [_case("w0", "u", 0, "valtest"), _case("w1", "w", 1, "valtest"), _case("q", "q", 1, "test")]
    split = {k: v[0] for k, v in assign_splits(official, seed=3).items()}
    assert split["t"] == "train" and split["q"] == "test"
    assert {split["v0"], split["w0"]} == {"val", "test"} and {split["v1"], split["w1"]} == {"val", "test"}

    pool = [_case(f"c{i}", f"c{i}", i % 2, "trainval") for i in range(6)]
    assert {v[0] for k, v in assign_splits(pool).items() if int(k[1:]) % 2} == {"val"}

    mixed = [_case(f"m{i}", f"m{i}", None, mixed=True) for i in range(10)]
    kept = assign_splits(mixed, train_anomalies=0.25)
    in_train = [v for v in kept.values() if v[0] == "train"]
    assert len(in_train) == 8 and sum(keep for _, keep in in_train) == 2

    small = assign_splits([_case("a", "a", 0), _case("b", "b", 0)])
    assert sorted(v[0] for v in small.values()) == ["test", "train"]
    unlabeled = assign_splits([_case("u", "u", None), _case("v", "v", None, "valtest")])
    assert unlabeled == {"u": ("train", False), "v": ("test", False)}


def test_split_fractions_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="summing to 1, got 0.8,0.1,0.2"):
        ingest("folder", tmp_path, tmp_path / "out", splits=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="train_anomalies must be in"):
        ingest("folder", tmp_path, tmp_path / "out", train_anomalies=1.5)


# --- layouts end to end ------------------------------------------------------------------------------


def make_mood(root: Path, train: int = 4, toy: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(train):
        _nifti(root / "brain_train" / f"{i:05d}.nii.gz", rng.random((6, 6, 6)).astype(np.float32))
    for i in range(toy):
        name = f"{train + i:05d}.nii.gz"
        _nifti(root / "toy" / name, rng.random((6, 6, 6)).astype(np.float32))
        mask = np.zeros((6, 6, 6), np.uint8)
        mask[1:3, 1:3, 1:3] = i % 2
        _nifti(root / "toy_label" / "pixel" / name, mask)
        (root / "toy_label" / "sample").mkdir(parents=True, exist_ok=True)
        (root / "toy_label" / "sample" / f"{name}.txt").write_text(f"{i % 2}\n")
    return root


def test_mood_ingest_trains_on_brain_train_and_splits_toy_between_val_and_test(tmp_path: Path) -> None:
    src = make_mood(tmp_path / "mood")
    report = ingest("mood", src, tmp_path / "out", salt="s", progress=False)
    rows = read_rows(tmp_path / "out")

    assert report.counts["train"] == {"normal": 4, "abnormal": 0, "unlabeled": 0, "total": 4}
    for split in ("val", "test"):
        assert report.counts[split]["normal"] >= 1 and report.counts[split]["abnormal"] >= 1
    volume = next(row for row in rows if row["split"] == "test" and row["label"] == 1)
    assert volume["shape"] == [6, 6, 6] and volume["dtype"] == "float32"
    assert volume["spacing"] == [1.0, 1.0, 2.0] and decode_affine(volume)[2, 2] == 2.0
    assert decode_mask(volume).sum() == 8
    assert report.reconciliation["label_files"] == 6 and report.reconciliation["files_seen"] == 4 + 12


def test_brats_ingest_counts_dropped_slices_and_keeps_train_normal(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for c in range(1, 11):
        folder = tmp_path / "brats" / f"BraTS20_Training_{c:03d}"
        name = folder.name
        flair = rng.integers(1, 300, (5, 5, 4)).astype(np.int16)
        flair[:, :, 0] = 0
        seg = np.zeros((5, 5, 4), np.uint8)
        seg[2, 2, 1 + c % 3] = 1
        _nifti(folder / f"{name}_flair.nii.gz", flair)
        _nifti(folder / f"{name}_seg.nii.gz", seg)

    report = ingest("brats", tmp_path / "brats", tmp_path / "out", salt="s", progress=False)

    dropped = report.manifest["rows_dropped_by_rule"]
    assert dropped["brats: slice without brain (all zero)"] == 10
    assert dropped["abnormal in a train group (train holds normal cases; see train_anomalies)"] == 8
    assert report.counts["train"] == {"normal": 16, "abnormal": 0, "unlabeled": 0, "total": 16}
    assert report.counts["val"]["abnormal"] == report.counts["test"]["abnormal"] == 1
    assert report.reconciliation == {
        "balanced": True,
        "files_excluded": {},
        "files_in_rows": 20,
        "files_quarantined": 0,
        "files_seen": 20,
        "label_files": 0,
        "other_files": 0,
    }


# --- bad input ---------------------------------------------------------------------------------------


def test_mask_shape_mismatch_quarantines_the_case_naming_the_mask(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", normals=2, abnormals=1)
    _png(src / "masks" / "p03" / "img.png", np.zeros((8, 8), np.uint8))  # p03: abnormal only, so read
    report = ingest("folder", src, tmp_path / "out", salt="s", progress=False)
    reasons = {q.path: q.reason for q in report.quarantine}
    assert set(reasons) == {"abnormal/p03/img.png", "masks/p03/img.png"}
    assert re.search(
        r"masks/p03/img.png has shape \(8, 8\) but its image .* \(16, 16\)", reasons["masks/p03/img.png"]
    )
    assert report.reconciliation["balanced"] and report.rows > 0


def test_duplicate_ids_are_an_error_naming_both_sources(tmp_path: Path) -> None:
    base = tmp_path / "chexpert"
    _png(base / "train" / "patient00001" / "study1" / "view1_frontal.jpg", _gray(1))
    with open(base / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Frontal/Lateral", "No Finding"])
        writer.writerow(["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "1.0"])
        writer.writerow(["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "1.0"])
    with pytest.raises(IngestError, match="duplicate id 'train/patient00001/study1/view1_frontal.jpg'"):
        ingest("chexpert", base, tmp_path / "out", salt="s", progress=False)


def test_everything_quarantined_still_writes_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "src" / "normal").mkdir(parents=True)
    (tmp_path / "src" / "normal" / "a.png").write_bytes(b"\x89PNG garbage")
    report = ingest("folder", tmp_path / "src", tmp_path / "out", salt="s", strict=True, progress=False)
    assert report.rows == 0 and report.shards == [] and report.failed
    assert report.quarantine[0].path == "normal/a.png"


# --- info --------------------------------------------------------------------------------------------


def test_info_reads_the_manifest_and_falls_back_to_the_shards(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    (src / "normal" / "bad.png").write_bytes(b"broken")
    ingest("folder", src, tmp_path / "out", salt="s", progress=False)

    summary = info(tmp_path / "out")
    assert summary["rows"] == 18 and summary["shards"] == 1 and summary["missing_shards"] == []
    assert summary["quarantine"]["files"] == 1
    assert sum(c["total"] for c in summary["counts"].values()) == 18
    assert len(info_tables(summary)) == 3

    (tmp_path / "out" / "manifest.json").unlink()
    fallback = info(tmp_path / "out")
    assert fallback["counts"] == summary["counts"] and fallback["groups"] == summary["groups"]
    with pytest.raises(FileNotFoundError):
        info(tmp_path / "nothing")


# --- CLI ---------------------------------------------------------------------------------------------


def _unwrapped(output: str) -> str:
    """CLI output without rich's error-box borders and line wrapping."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("ingest")(ingest_command)
    app.add_typer(data_app, name="data")
    return app


def test_cli_ingest_strict_info_and_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    app = _app()
    src = make_folder(tmp_path / "src", normals=4, abnormals=2)
    out = tmp_path / "out"
    common = ["ingest", str(src), str(out), "--salt", "s", "--no-progress"]

    ok = runner.invoke(
        app, [*common, "--layout", "folder", "--split", "0.5,0.25,0.25", "--max-shard-mb", "1"]
    )
    assert ok.exit_code == 0, ok.output
    assert re.search(r"files seen = files in rows \+ files quarantined: (\d+) = \1 \+ 0", ok.output)
    assert json.loads((out / "manifest.json").read_text())["params"]["splits"] == [0.5, 0.25, 0.25]

    (src / "normal" / "broken.png").write_bytes(b"broken")
    strict = runner.invoke(app, [*common, "--layout", "folder", "--strict"])
    assert strict.exit_code == 1 and "normal/broken.png" in strict.output

    unknown = runner.invoke(app, [*common, "--layout", "moood"])
    assert unknown.exit_code == 2 and "unknown layout 'moood'; known: brats, chexpert" in _unwrapped(
        unknown.output
    )
    bad_split = runner.invoke(app, [*common, "--layout", "folder", "--split", "0.8,0.3"])
    assert bad_split.exit_code == 2 and "0.8,0.3" in _unwrapped(bad_split.output)
    bad_option = runner.invoke(app, [*common, "--layout", "brats", "--option", "modalty=t1"])
    assert bad_option.exit_code == 2 and "known: modality" in _unwrapped(bad_option.output)
    no_equals = runner.invoke(app, [*common, "--layout", "brats", "-o", "modality"])
    assert no_equals.exit_code == 2 and "key=value" in _unwrapped(no_equals.output)
    missing = runner.invoke(
        app, ["ingest", str(tmp_path / "none"), str(out), "--layout", "folder", "--salt", "s"]
    )
    assert missing.exit_code == 2 and "does not exist" in _unwrapped(missing.output)

    shown = runner.invoke(app, ["data", "info", str(out)])
    assert shown.exit_code == 0 and "normal" in shown.output and "quarantine" in shown.output
    as_json = runner.invoke(app, ["data", "info", str(out), "--json"])
    assert json.loads(as_json.output)["quarantine"]["files"] == 1
    assert runner.invoke(app, ["data", "info", str(tmp_path / "none")]).exit_code == 2


def test_cli_synth_calls_synthesize_then_ingests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def synthesize(kind: str, out: Path, **kwargs: Any) -> str:
        if kind != "digitanatomy":
            raise ValueError(f"unknown synthetic dataset {kind!r}; known: digitanatomy, synthetic-brain")
        calls.append({"kind": kind, "out": out, **kwargs})
        make_folder(Path(out), normals=5, abnormals=2)
        return "folder"

    fake = types.ModuleType("medood.platform.data.synthetic")
    fake.synthesize = synthesize  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medood.platform.data.synthetic", fake)
    monkeypatch.setenv("MEDOOD_SALT", "s")
    runner = CliRunner()
    result = runner.invoke(
        _app(),
        [
            "data",
            "synth",
            "digitanatomy",
            str(tmp_path / "d"),
            "--n-train",
            "5",
            "--size",
            "16",
            "--seed",
            "3",
            "--shards",
            str(tmp_path / "shards"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        {
            "kind": "digitanatomy",
            "out": tmp_path / "d",
            "n_train": 5,
            "size": 16,
            "seed": 3,
            "progress": False,
        }
    ]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (
        manifest["dataset"] == "digitanatomy" and manifest["rows"] == 5 + 2 + 4 - 1
    )  # 1 mixed group in train
    bad = runner.invoke(_app(), ["data", "synth", "brainz", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "known: digitanatomy, synthetic-brain" in _unwrapped(bad.output)


def test_synthetic_data_rows_carry_their_anomaly_type(tmp_path: Path) -> None:
    from medood.platform.data import ingest as ingest_module
    from medood.platform.data.synthetic import GENERATION_FILE, iter_cases, synthesize

    assert ingest_module.GENERATION_FILE == GENERATION_FILE
    layout = synthesize("digitanatomy", tmp_path / "digits", n_train=4, n_test=8, size=24, seed=0)
    report = ingest(layout, tmp_path / "digits", tmp_path / "out", salt="s", progress=False)
    expected = {c["file"]: c["anomaly"] for c in iter_cases(tmp_path / "digits")}
    rows = [r for s in report.shards for r in pq.read_table(tmp_path / "out" / s["path"]).to_pylist()]
    anomalies = {r["id"]: json.loads(r["meta"])["anomaly"] for r in rows}
    assert anomalies == {i: expected[i] for i in anomalies} and len(anomalies) == report.rows
    assert "normal" in anomalies.values() and len(set(anomalies.values())) > 2
    # without a generation.json rows carry no anomaly type
    (tmp_path / "digits" / GENERATION_FILE).unlink()
    plain = ingest(layout, tmp_path / "digits", tmp_path / "out2", salt="s", progress=False)
    table = pq.read_table(tmp_path / "out2" / plain.shards[0]["path"], columns=["meta"]).to_pylist()
    assert all("anomaly" not in json.loads(r["meta"]) for r in table)
