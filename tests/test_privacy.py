"""Privacy: salts, pseudonyms, the DICOM tag whitelist, and no patient identity in any output byte."""

from __future__ import annotations

import csv
import shutil
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medood.platform.data.ingest import ingest
from medood.platform.data.privacy import DICOM_META_WHITELIST, dicom_meta, pseudonymize, resolve_salt


@pytest.fixture(autouse=True)
def data_salt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the secret salt file of these tests out of the real ~/.medood."""
    monkeypatch.setenv("MEDOOD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDOOD_SALT", raising=False)
    return tmp_path / "home"


def test_salt_from_argument_environment_or_secret_file(
    data_salt_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_salt("given").value == "given" and resolve_salt("given").source == "argument"
    with pytest.raises(ValueError, match="non-empty"):
        resolve_salt("")

    secret = resolve_salt()
    path = data_salt_home / "salt"
    assert secret.source == str(path) and len(secret.value) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_salt().value == secret.value  # created once, then reused

    monkeypatch.setenv("MEDOOD_SALT", "from-env")
    assert resolve_salt().value == "from-env"
    assert secret.fingerprint != resolve_salt().fingerprint and secret.value not in secret.fingerprint


def test_pseudonyms_are_salted_truncated_and_stable() -> None:
    one, two = resolve_salt("one"), resolve_salt("two")
    assert pseudonymize("PAT-001", one) == pseudonymize("PAT-001", one)
    assert pseudonymize("PAT-001", one) != pseudonymize("PAT-001", two)
    assert pseudonymize("PAT-001", one) != pseudonymize("PAT-002", one)
    assert len(pseudonymize("PAT-001", one)) == 16 and "PAT" not in pseudonymize("PAT-001", one)


def test_dicom_meta_keeps_only_whitelisted_technical_tags() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    meta = dicom_meta(ds)
    assert set(meta) <= set(DICOM_META_WHITELIST)
    assert meta["Modality"] == "CT" and meta["PixelSpacing"] == [float(v) for v in ds.PixelSpacing]
    assert meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    text = repr(meta)
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyDate"):
        value = str(ds.get(tag, "")).strip()
        assert not value or value not in text


def _identity(path: str) -> list[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [str(ds.PatientName), str(ds.PatientID)]


def _assert_absent(out: Path, secrets: list[str]) -> None:
    """Neither the raw bytes of any output file nor any decompressed column value holds a secret."""
    files = sorted(out.iterdir())
    assert any(f.name.endswith(".parquet") for f in files) and (out / "manifest.json") in files
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} in {path.name}"
    for shard in out.glob("*.parquet"):
        for row in pq.read_table(shard).to_pylist():
            for column, value in row.items():
                blob = value if isinstance(value, bytes) else str(value).encode()
                for secret in secrets:
                    assert secret.encode() not in blob, f"{secret!r} in column {column} of {row['id']}"


def test_dicom_patient_identity_never_reaches_shards_or_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    (src / "abnormal").mkdir(parents=True)
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    shutil.copy(ct, src / "normal" / "ct.dcm")
    shutil.copy(mr, src / "abnormal" / "mr.dcm")
    shutil.copy(get_testdata_file("JPEG-lossy.dcm"), src / "abnormal" / "undecodable.dcm")
    secrets = _identity(ct) + _identity(mr) + _identity(get_testdata_file("JPEG-lossy.dcm"))
    assert "CompressedSamples^CT1" in secrets and "1CT1" in secrets

    report = ingest("folder", src, tmp_path / "out", splits=(0.0, 0.5, 0.5), progress=False)

    assert report.rows == 2 and len(report.quarantine) == 1
    _assert_absent(tmp_path / "out", secrets + ["CompressedSamples"])
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert {row["id"] for row in rows} == {"normal/ct.dcm", "abnormal/mr.dcm"}
    assert all(len(row["group"]) == 16 for row in rows)


def _rsna_image(path: Path, patient: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = patient, patient, "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_rsna_patient_ids_in_file_names_are_hashed_everywhere(tmp_path: Path) -> None:
    src = tmp_path / "rsna"
    (src / "stage_2_train_images").mkdir(parents=True)
    patients = [
        "c1a8e4f2-0001-4e49-80ba-63a80b6bddd6",
        "d2b9f5a3-0002-4b36-a041-de91049b9ab4",
        "e3caa6b4-0003",
    ]
    with open(src / "stage_2_train_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(
            [[patients[0], "", "", "", "", 0], [patients[1], 1, 1, 3, 3, 1], [patients[2], "", "", "", "", 0]]
        )
    with open(src / "stage_2_detailed_class_info.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "class"])
        writer.writerows([[patients[0], "Normal"], [patients[1], "Lung Opacity"], [patients[2], "Normal"]])
    for patient in patients[:2]:
        _rsna_image(src / "stage_2_train_images" / f"{patient}.dcm", patient)
    (src / "stage_2_train_images" / f"{patients[2]}.dcm").write_bytes(b"truncated")  # quarantined

    report = ingest("rsna", src, tmp_path / "out", salt="site-secret", splits=(0.0, 0.5, 0.5), progress=False)

    assert report.rows == 2 and len(report.quarantine) == 1
    assert report.quarantine[0].path.startswith("stage_2_train_images/")
    _assert_absent(tmp_path / "out", patients + [p.split("-")[0] for p in patients])
