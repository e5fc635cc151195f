"""Files from the wild: pydicom's and nibabel's own test corpora, broken copies of them, random bytes.

Every DICOM file pydicom ships for its tests and every NIfTI nibabel ships, plus truncated,
bit-flipped and header-mutated copies, go through ``medood ingest`` (the CLI): it must exit 0
(1 with ``--strict``), account for every file (files seen = in rows + quarantined), quarantine
with reasons that name tags and never values, and keep patient identity (PatientName, PatientID,
birth date, institution) out of the shards, the manifest, the reasons and the logs. Property
tests feed random and mutated bytes to every reader: each returns a 2D/3D image within the voxel
limit or raises an ``ImageReadError``, nothing else.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from typer.testing import CliRunner

from medood.platform.data.cli import data_app, ingest_command
from medood.platform.data.readers import (
    HINTS,
    ImageData,
    ImageReadError,
    group_dicom_files,
    read_bytes,
    read_dicom_series,
)

MAX_VOXELS = 2**22
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName")
NIFTI_SECRET = "Doe^Jane 1970-01-01 St Elsewhere"
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _pydicom_files() -> list[Path]:
    return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())


def _nibabel_files() -> list[Path]:
    import nibabel.testing

    root = Path(nibabel.testing.data_path)
    return sorted(p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz")))


def _identity(path: Path) -> set[str]:
    """The identity values of a DICOM file worth searching for (long enough not to match by chance)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return set()
    values = set()
    for keyword in IDENTITY_KEYWORDS:
        try:
            value = str(ds.get(keyword) or "").strip()
        except Exception:
            element = ds.get_item(keyword)
            value = element.value.decode("latin-1").strip() if element is not None else ""
        if len(value) >= 4 and not value.isdigit():
            values.add(value)
    return values


# --- mutations ---------------------------------------------------------------------------------------


def _truncations(data: bytes) -> list[bytes]:
    return [data[: len(data) // 2], data[:300]]


def _bit_flips(data: bytes, rng: np.random.Generator, n: int = 12) -> bytes:
    array = bytearray(data)
    header = min(len(array), 2048)
    for position in list(rng.integers(0, header, n // 2)) + list(rng.integers(0, len(array), n // 2)):
        array[int(position)] ^= 1 << int(rng.integers(0, 8))
    return bytes(array)


def _dicom_header_mutations(path: Path) -> list[bytes]:
    """Header values a reader needs, made malformed or absurd (values stay raw, as on disk)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    try:
        base = pydicom.dcmread(path, force=True)
        if "PixelData" not in base:
            return []
    except Exception:
        return []
    mutations = [
        (0x00280008, "IS", b"1A"),  # NumberOfFrames
        (0x00280010, "US", b"\x00\x00"),  # Rows = 0
        (0x00280011, "US", b"\xff\xff"),  # Columns = 65535
        (0x00280030, "DS", b"x\\y"),  # PixelSpacing
        (0x00200037, "DS", b"nan\\0\\0\\0\\1\\0"),  # ImageOrientationPatient
        (0x00281053, "DS", b"Doe^Jane"),  # RescaleSlope
        (0x00280100, "US", b"\x07\x00"),  # BitsAllocated = 7
    ]
    out = []
    for tag, vr, value in mutations:
        ds = pydicom.dcmread(path, force=True)
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer)
        except Exception:
            continue
        out.append(buffer.getvalue())
    return out


def _nifti_header_mutations(data: bytes) -> list[bytes]:
    """dim, datatype, vox_offset and pixdim of a NIfTI-1 header made invalid or absurd."""
    import gzip

    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    if struct.unpack("<i", raw[:4])[0] != 348:
        return []
    edits = [
        (40, struct.pack("<h", 9)),  # dim[0] = 9
        (42, struct.pack("<h", -5)),  # dim[1] negative
        (40, struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)),  # 2.7e13 voxels declared
        (70, struct.pack("<h", 9999)),  # unknown datatype
        (108, struct.pack("<f", 1e12)),  # vox_offset far past the end
        (80, struct.pack("<f", float("nan")) * 3),  # pixdim NaN
    ]
    out = []
    for offset, value in edits:
        mutated = bytearray(raw)
        mutated[offset : offset + len(value)] = value
        out.append(gzip.compress(bytes(mutated)) if data[:2] == b"\x1f\x8b" else bytes(mutated))
    return out


def _build_corpus(root: Path, originals: list[Path], kind: str) -> Path:
    """originals under normal/, their broken copies under unlabeled/ (the folder layout)."""
    rng = np.random.default_rng(0)
    suffix = ".dcm" if kind == "dicom" else ".nii"
    for index, path in enumerate(originals):
        target = root / "normal" / f"{index:03d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        if kind == "dicom" and (path.suffix != ".dcm" or index % 3):
            continue  # broken copies of every third DICOM file: the corpus is large
        data = path.read_bytes()
        gz = ".gz" if data[:2] == b"\x1f\x8b" else ""
        copies = [*_truncations(data), _bit_flips(data, rng)]
        copies += _dicom_header_mutations(path) if kind == "dicom" else _nifti_header_mutations(data)
        if kind == "nifti" and not gz and _nifti_version_1(data):
            secret = bytearray(data)
            secret[148 : 148 + len(NIFTI_SECRET)] = NIFTI_SECRET.encode()  # descrip: free text
            copies.append(bytes(secret))
        for number, copy in enumerate(copies):
            # a folder each: copies of one slice must not form a series of their own
            name = root / "unlabeled" / f"{index:03d}_{number}" / f"{path.stem}{suffix}{gz}"
            name.parent.mkdir(parents=True, exist_ok=True)
            name.write_bytes(copy)
    return root


def _nifti_version_1(data: bytes) -> bool:
    return len(data) >= 348 and data[344:348] == b"n+1\x00"


# --- ingest of the corpora ---------------------------------------------------------------------------


def _app():
    import typer

    app = typer.Typer()
    app.command("ingest")(ingest_command)
    app.add_typer(data_app, name="data")
    return app


def _ingest(src: Path, out: Path, caplog: pytest.LogCaptureFixture, *extra: str):
    runner = CliRunner()
    args = ["ingest", str(src), str(out), "--layout", "folder", "--salt", "s", "--no-progress"]
    args += ["--max-voxels", str(MAX_VOXELS), *extra]
    with caplog.at_level(logging.DEBUG):
        return runner.invoke(_app(), args)


def _check_accounted_and_private(src: Path, out: Path, result, secrets: set[str], logs: str) -> Counter:
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["reconciliation"]
    assert rec["balanced"] and rec["files_seen"] == rec["files_in_rows"] + rec["files_quarantined"]
    files = [p for p in src.rglob("*") if p.is_file()]
    # every file in a class folder is read (non-images are quarantined as unsupported)
    assert rec["files_seen"] == len(files) and rec["other_files"] == 0 and rec["files_excluded"] == {}
    assert re.search(
        r"files seen = files in rows \+ files quarantined: (\d+) = (\d+) \+ (\d+)", result.output
    )
    reasons = [q["reason"] for q in manifest["quarantine"]]
    texts = [
        json.dumps({k: v for k, v in manifest.items() if k != "quarantine"}),
        *reasons,
        result.output,
        logs,
    ]
    for shard in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(shard, columns=["id", "dataset", "split", "group", "meta", "dtype"])
        texts.append(json.dumps(table.to_pylist()))
    everything = "\n".join(texts)
    leaked = sorted(s for s in secrets if s in everything)
    assert leaked == [], f"identity values in the output: {leaked}"
    return Counter(re.sub(r"\d+", "N", r) for r in reasons)


def test_ingest_of_the_pydicom_corpus_and_its_broken_copies(tmp_path: Path, caplog, capsys) -> None:
    originals = _pydicom_files()
    src = _build_corpus(tmp_path / "pydicom", originals, "dicom")
    secrets = set().union(*(_identity(p) for p in originals))
    assert len(secrets) > 10  # the corpus does hold identity-like values to look for
    secrets.add("Doe^Jane")  # written into RescaleSlope by a header mutation

    result = _ingest(src, tmp_path / "out", caplog)
    logs = caplog.text + "".join(capsys.readouterr())
    reasons = _check_accounted_and_private(src, tmp_path / "out", result, secrets, logs)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] > 40
    assert any("malformed DICOM header value: NumberOfFrames (" in r for r in reasons)
    assert any("RescaleSlope (" in r for r in reasons)
    print("\npydicom corpus:", manifest["reconciliation"], "rows", manifest["rows"])
    for reason, n in reasons.most_common():
        print(f"  {n:4d}  {reason}")
    strict = _ingest(src, tmp_path / "out-strict", caplog, "--strict")
    assert strict.exit_code == 1


def test_ingest_of_the_nibabel_corpus_and_its_broken_copies(tmp_path: Path, caplog, capsys) -> None:
    src = _build_corpus(tmp_path / "nibabel", _nibabel_files(), "nifti")

    result = _ingest(src, tmp_path / "out", caplog)
    logs = caplog.text + "".join(capsys.readouterr())
    reasons = _check_accounted_and_private(src, tmp_path / "out", result, {NIFTI_SECRET, "Elsewhere"}, logs)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] >= 3
    assert any("wrong dimensionality" in r for r in reasons)  # the 4D files
    assert any("over the limit" in r for r in reasons)  # 30000^3 declared
    print("\nnibabel corpus:", manifest["reconciliation"], "rows", manifest["rows"])
    for reason, n in reasons.most_common():
        print(f"  {n:4d}  {reason}")


def test_the_malformed_integer_string_from_the_issue_no_longer_stops_an_ingest(tmp_path: Path) -> None:
    """The file behind "invalid literal for int() with base 10: '1A'" is quarantined; the rest ingest."""
    src = tmp_path / "src"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (src / "normal" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(get_testdata_file(name), src / "normal" / name)
    bad = [b for b in _dicom_header_mutations(Path(get_testdata_file("CT_small.dcm"))) if b"1A" in b][0]
    (src / "normal" / "bad.dcm").write_bytes(bad)

    result = CliRunner().invoke(
        _app(),
        ["ingest", str(src), str(tmp_path / "out"), "--layout", "folder", "--salt", "s", "--no-progress"],
    )

    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == 2
    assert manifest["quarantine"] == [
        {
            "path": "normal/bad.dcm",
            "reason": "HeaderValueError: malformed DICOM header value: NumberOfFrames (0028,0008)",
        }
    ]
    assert "1A" not in result.output


# --- property tests: random and mutated bytes to every reader ----------------------------------------


def _seeds() -> list[bytes]:
    volume = np.random.default_rng(0).integers(0, 500, (6, 5, 4)).astype(np.int16)
    nifti = nib.Nifti1Image(volume, np.diag([-1.0, 2.0, 1.5, 1.0])).to_bytes()
    nifti2 = nib.Nifti2Image(volume.astype(np.float32), np.eye(4)).to_bytes()
    from PIL import Image

    pictures = []
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(volume[:, :, 0].astype(np.uint8)).save(buffer, format=fmt)
        pictures.append(buffer.getvalue())
    dicoms = [
        Path(get_testdata_file(name)).read_bytes()
        for name in ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm")
    ]
    import gzip

    return [nifti, gzip.compress(nifti), nifti2, *pictures, *dicoms]


SEEDS = _seeds()


def _check_outcome(data: bytes, hint: str | None) -> None:
    try:
        image = read_bytes(data, hint, max_voxels=MAX_VOXELS)
    except ImageReadError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert isinstance(image, ImageData)
    assert image.array.ndim in (2, 3) and 0 < image.array.size <= MAX_VOXELS
    assert image.array.dtype.kind in "uif"
    if image.affine is not None:
        assert image.affine.shape == (4, 4) and np.isfinite(image.affine).all()


@PROPERTY
@given(data=st.binary(max_size=2048), hint=st.sampled_from([None, *HINTS]))
def test_random_bytes_are_read_or_refused_with_an_image_read_error(data: bytes, hint: str | None) -> None:
    _check_outcome(data, hint)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        near_header = draw(st.booleans())
        limit = min(len(data), 600) if near_header else len(data)
        if not data:
            break
        at = draw(st.integers(0, max(limit - 1, 0)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff", b"1A"]))
            data[at : at + len(value)] = value
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@PROPERTY
@given(data=_mutated(), hint=st.sampled_from([None, "dicom", "nifti", "picture"]))
def test_mutated_files_are_read_or_refused_with_an_image_read_error(data: bytes, hint: str | None) -> None:
    _check_outcome(data, hint)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1500), st.integers(0, 7)), max_size=6))
def test_mutated_series_are_read_or_refused_with_an_image_read_error(tmp_path_factory, flips) -> None:
    folder = tmp_path_factory.mktemp("series")
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for index in range(3):
        base.ImagePositionPatient = [0.0, 0.0, float(index)]
        buffer = io.BytesIO()
        base.save_as(buffer)
        (folder / f"IM{index}.dcm").write_bytes(buffer.getvalue())
    for index, at, bit in flips:
        path = folder / f"IM{index}.dcm"
        data = bytearray(path.read_bytes())
        data[at] ^= 1 << bit
        path.write_bytes(bytes(data))
    units, failures = group_dicom_files(sorted(folder.iterdir()), max_voxels=MAX_VOXELS)
    assert len(failures) + sum(len(u.files) for u in units) == 3
    for unit in units:
        try:
            image = read_dicom_series(unit.files, max_voxels=MAX_VOXELS)
        except ImageReadError:
            continue
        assert image.array.ndim in (2, 3)
