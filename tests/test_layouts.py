"""Layouts: each public release's folder structure, on small fixtures written in the real formats."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medood.platform.data.layouts import (
    LAYOUTS,
    Discovery,
    IngestError,
    LayoutContext,
    MaskShapeError,
    get_layout,
)

# --- writers of the real formats (shared in spirit with tests/test_ingest.py) -------------------------


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def write_picture(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dicom_2d(path: Path, pixels: np.ndarray, patient_id: str) -> Path:
    """A minimal CR radiograph (8-bit MONOCHROME2), like RSNA's stage_2_train_images files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.BodyPartExamined = (
        patient_id,
        f"Doe^{patient_id}",
        "CR",
        "CHEST",
    )
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [0.14, 0.14]
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _gray(seed: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, shape, dtype=np.uint8)


def discover(name: str, src: Path, **options: Any) -> Discovery:
    return get_layout(name).run(LayoutContext(src, lambda key: f"h{abs(hash(key)) % 10**8:08d}"), **options)


def by_id(found: Discovery) -> dict[str, Any]:
    return {case.id: case for case in found.cases}


# --- registry ----------------------------------------------------------------------------------------


def test_unknown_layout_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        get_layout("moood")
    assert (
        str(error.value)
        == "unknown layout 'moood'; known: brats, chexpert, folder, mood, mura, rsna, zhanglab"
    )
    assert sorted(LAYOUTS) == ["brats", "chexpert", "folder", "mood", "mura", "rsna", "zhanglab"]


def test_unknown_option_and_bad_choice_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown option 'modalty' for layout 'brats'; known: modality"):
        discover("brats", tmp_path, modalty="t1")
    with pytest.raises(ValueError, match="unknown modality 'pd'; known: flair, t1, t1ce, t2"):
        discover("brats", tmp_path, modality="pd")


# --- mood --------------------------------------------------------------------------------------------


def make_mood(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        write_nifti(root / "brain_train" / f"{i:05d}.nii.gz", rng.random((8, 8, 8)).astype(np.float32))
    for i in range(4):
        name = f"toy_{i}.nii.gz"
        write_nifti(root / "toy" / name, rng.random((8, 8, 8)).astype(np.float32))
        mask = np.zeros((8, 8, 8), np.uint8)
        if i >= 2:
            mask[2:4, 2:4, 2:4] = 1
        write_nifti(root / "toy_label" / "pixel" / name, mask)
        (root / "toy_label" / "sample").mkdir(parents=True, exist_ok=True)
        (root / "toy_label" / "sample" / f"{name}.txt").write_text(f"{int(i >= 2)}\n")
    return root


def test_mood_train_volumes_and_labelled_toy_cases(tmp_path: Path) -> None:
    src = make_mood(tmp_path / "mood")
    write_nifti(src / "toy_label" / "pixel" / "toy_9.nii.gz", np.zeros((8, 8, 8), np.uint8))

    found = discover("mood", src)
    cases = by_id(found)

    assert [c.pool for c in found.cases].count("train") == 3
    assert cases["brain_train/00000.nii.gz"].label == 0
    toy = [cases[f"toy/toy_{i}.nii.gz"] for i in range(4)]
    assert [c.label for c in toy] == [0, 0, 1, 1] and {c.pool for c in toy} == {"valtest"}
    assert [f.display for f in toy[2].files] == ["toy/toy_2.nii.gz", "toy_label/pixel/toy_2.nii.gz"]
    assert len(found.label_files) == 4
    assert [(s.display, r) for s, r in found.quarantined] == [
        ("toy_label/pixel/toy_9.nii.gz", "mask without a matching image in toy/")
    ]
    rows = toy[3].load().items
    assert len(rows) == 1 and rows[0].mask.sum() == 8 and rows[0].image.array.shape == (8, 8, 8)


def test_mood_label_from_mask_when_sample_file_is_missing_and_bad_sample_is_an_error(tmp_path: Path) -> None:
    src = make_mood(tmp_path / "mood")
    (src / "toy_label" / "sample" / "toy_3.nii.gz.txt").unlink()
    assert by_id(discover("mood", src))["toy/toy_3.nii.gz"].label == 1
    (src / "toy_label" / "sample" / "toy_0.nii.gz.txt").write_text("maybe")
    with pytest.raises(IngestError, match="toy_0.nii.gz.txt"):
        discover("mood", src)


# --- brats -------------------------------------------------------------------------------------------


def make_brats(root: Path, cases: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for c in range(1, cases + 1):
        name = f"BraTS20_Training_{c:03d}"
        folder = root / "MICCAI_BraTS2020_TrainingData" / name
        for modality in ("flair", "t1", "t1ce", "t2"):
            volume = rng.integers(1, 500, (6, 6, 5)).astype(np.int16)
            volume[:, :, 0] = 0  # no brain on the first slice
            write_nifti(folder / f"{name}_{modality}.nii.gz", volume)
        seg = np.zeros((6, 6, 5), np.uint8)
        seg[1:3, 1:3, c % 3 + 2] = 4  # tumour on one slice (2, 3 or 4)
        seg[3, 3, 1] = 2 if c == 1 else 0
        write_nifti(folder / f"{name}_seg.nii.gz", seg)
    (root / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv").write_text("BraTS_2020_subject_ID\n")
    return root


def test_brats_slices_with_tumour_labels_and_dropped_empty_slices(tmp_path: Path) -> None:
    src = make_brats(tmp_path / "brats")
    found = discover("brats", src)

    assert len(found.cases) == 3 and all(c.mixed and c.pool is None for c in found.cases)
    first = found.cases[0]
    assert [f.display.rsplit("_", 1)[1] for f in first.files] == ["flair.nii.gz", "seg.nii.gz"]
    assert sorted({r for _, r in found.excluded}) == [
        "modality 't1' not selected (modality=flair)",
        "modality 't1ce' not selected (modality=flair)",
        "modality 't2' not selected (modality=flair)",
    ]
    loaded = first.load()
    assert loaded.dropped == {"brats: slice without brain (all zero)": 1}
    assert [item.id.rsplit("#", 1)[1] for item in loaded.items] == ["z001", "z002", "z003", "z004"]
    assert [item.label for item in loaded.items] == [1, 0, 1, 0]  # case 1: seg on z=1 and z=3
    item = loaded.items[2]
    assert item.image.array.shape == (6, 6) and item.mask.sum() == 4 and item.image.array.dtype == np.int16
    np.testing.assert_allclose(item.image.affine @ [0, 0, 0, 1], [0, 0, 3, 1])  # slice z=3 in world


def test_brats_other_modality_and_seg_shape_mismatch(tmp_path: Path) -> None:
    src = make_brats(tmp_path / "brats", cases=1)
    found = discover("brats", src, modality="t1ce")
    assert found.cases[0].files[0].display.endswith("_t1ce.nii.gz")
    seg = next(src.rglob("*_seg.nii.gz"))
    write_nifti(seg, np.zeros((6, 6, 4), np.uint8))
    with pytest.raises(MaskShapeError, match="_seg.nii.gz has shape"):  # ingest quarantines the case
        discover("brats", src).cases[0].load()


# --- chexpert ----------------------------------------------------------------------------------------


def make_chexpert(root: Path) -> Path:
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Pleural Effusion"]
    train = []
    for p in range(1, 7):
        for study, view in ((1, "Frontal"), (1, "Lateral")):
            rel = f"train/patient{p:05d}/study{study}/view{1 if view == 'Frontal' else 2}_{view.lower()}.jpg"
            write_picture(base / rel, _gray(p))
            no_finding = "1.0" if p % 2 else ""
            train.append(
                [f"CheXpert-v1.0-small/{rel}", "F", 50, view, "AP", no_finding, "" if p % 2 else "1.0"]
            )
    write_csv(base / "train.csv", header, train)
    valid = []
    for p in range(64541, 64543):
        rel = f"valid/patient{p}/study1/view1_frontal.jpg"
        write_picture(base / rel, _gray(p))
        valid.append(
            [f"CheXpert-v1.0-small/{rel}", "M", 60, "Frontal", "PA", "1.0" if p % 2 else "0.0", "0.0"]
        )
    write_csv(base / "valid.csv", header, valid)
    return root


def test_chexpert_labels_views_groups_and_official_pools(tmp_path: Path) -> None:
    src = make_chexpert(tmp_path / "chexpert")
    found = discover("chexpert", src)

    assert len(found.cases) == 8 and len(found.excluded) == 6
    cases = by_id(found)
    first = cases["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert (first.label, first.group_key, first.pool) == (0, "patient00001", "trainval")
    assert cases["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"].label == 1
    valid = [c for c in found.cases if c.pool == "test"]
    assert sorted(c.label for c in valid) == [0, 1]
    assert len(discover("chexpert", src, view="all").cases) == 14
    item = first.load().items[0]
    assert item.image.array.dtype == np.uint8 and item.meta == {"view": "frontal"}


def test_chexpert_missing_listed_image_is_an_error_naming_it(tmp_path: Path) -> None:
    src = make_chexpert(tmp_path / "chexpert")
    next(src.rglob("patient00003/study1/view1_frontal.jpg")).unlink()
    with pytest.raises(
        IngestError, match=r"train.csv line \d+: listed image .*patient00003/study1/view1_frontal.jpg"
    ):
        discover("chexpert", src)


# --- zhanglab ----------------------------------------------------------------------------------------


def make_zhanglab(root: Path) -> Path:
    base = root / "chest_xray"
    names = {
        ("train", "NORMAL"): [
            "IM-0115-0001.jpeg",
            "IM-0115-0002.jpeg",
            "NORMAL2-IM-1427-0001.jpeg",
            "IM-0117-0001.jpeg",
        ],
        ("train", "PNEUMONIA"): [
            "person1_bacteria_1.jpeg",
            "person1_virus_2.jpeg",
            "person3_bacteria_10.jpeg",
        ],
        ("test", "NORMAL"): ["IM-0001-0001.jpeg", "NORMAL2-IM-0002-0001.jpeg"],
        ("test", "PNEUMONIA"): ["person100_bacteria_475.jpeg", "person101_virus_187.jpeg"],
    }
    for (split, label), files in names.items():
        for i, name in enumerate(files):
            write_picture(base / split / label / name, _gray(i))
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00")
    return root


def test_zhanglab_official_splits_and_patient_groups(tmp_path: Path) -> None:
    src = make_zhanglab(tmp_path / "zhanglab")
    found = discover("zhanglab", src)
    cases = by_id(found)

    assert len(found.cases) == 11
    assert cases["chest_xray/train/NORMAL/IM-0115-0002.jpeg"].group_key == "train/IM-0115"
    assert cases["chest_xray/train/NORMAL/NORMAL2-IM-1427-0001.jpeg"].group_key == "train/NORMAL2-IM-1427"
    assert cases["chest_xray/train/PNEUMONIA/person1_virus_2.jpeg"].group_key == "train/person1"
    assert cases["chest_xray/train/PNEUMONIA/person1_virus_2.jpeg"].label == 1
    assert {c.pool for c in found.cases} == {"trainval", "test"}
    assert cases["chest_xray/test/NORMAL/IM-0001-0001.jpeg"].pool == "test"


# --- mura --------------------------------------------------------------------------------------------


def make_mura(root: Path) -> Path:
    base = root / "MURA-v1.1"
    listing = {"train": [], "valid": []}
    studies = [
        ("train", "XR_ELBOW", "patient00011", "study1_negative", 2),
        ("train", "XR_ELBOW", "patient00012", "study1_positive", 1),
        ("train", "XR_HAND", "patient00011", "study1_positive", 1),
        ("valid", "XR_ELBOW", "patient11185", "study1_negative", 1),
        ("valid", "XR_HAND", "patient11186", "study1_positive", 1),
    ]
    for split, part, patient, study, images in studies:
        for i in range(1, images + 1):
            rel = f"{split}/{part}/{patient}/{study}/image{i}.png"
            write_picture(base / rel, _gray(i))
            listing[split].append(f"MURA-v1.1/{rel}")
    for split, lines in listing.items():
        (base / f"{split}_image_paths.csv").write_text("\n".join(lines) + "\n")
    return root


def test_mura_labels_groups_pools_and_body_part_option(tmp_path: Path) -> None:
    src = make_mura(tmp_path / "mura")
    found = discover("mura", src)
    cases = by_id(found)

    assert len(found.cases) == 6
    elbow = cases["MURA-v1.1/train/XR_ELBOW/patient00011/study1_negative/image2.png"]
    assert (elbow.label, elbow.group_key, elbow.pool) == (0, "patient00011/XR_ELBOW", "trainval")
    assert (
        cases["MURA-v1.1/train/XR_HAND/patient00011/study1_positive/image1.png"].group_key
        == "patient00011/XR_HAND"
    )
    assert cases["MURA-v1.1/valid/XR_HAND/patient11186/study1_positive/image1.png"].pool == "test"
    hands = discover("mura", src, body_part="hand")
    assert len(hands.cases) == 2 and len(hands.excluded) == 4
    with pytest.raises(ValueError, match="unknown body_part 'XR_KNEE'"):
        discover("mura", src, body_part="knee")


def test_mura_pooled_deals_both_official_sets_and_keeps_mixed_units_out_of_train(tmp_path: Path) -> None:
    src = make_mura(tmp_path / "mura")
    listing = src / "MURA-v1.1" / "train_image_paths.csv"
    listing.write_text(listing.read_text() + "MURA-v1.1/train/XR_ELBOW/patient00011/study2_positive/image1.png\n")
    write_picture(src / "MURA-v1.1/train/XR_ELBOW/patient00011/study2_positive/image1.png", _gray(1))
    cases = by_id(discover("mura", src, pooled=True))
    pools = {c.group_key: c.pool for c in cases.values()}
    assert pools["patient00011/XR_ELBOW"] == "valtest"  # normal and abnormal studies: a mixed unit
    assert pools["patient00012/XR_ELBOW"] is None and pools["patient11185/XR_ELBOW"] is None
    with pytest.raises(ValueError, match="pooled must be true or false"):
        discover("mura", src, pooled="yes")


# --- rsna --------------------------------------------------------------------------------------------


def make_rsna(root: Path) -> Path:
    labels = [
        ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "", "", "", "", 0],
        ["00436515-870c-4b36-a041-de91049b9ab4", 4, 2, 5, 3, 1],
        ["00436515-870c-4b36-a041-de91049b9ab4", 10, 8, 2, 2, 1],
        ["003d8fa0-6bf1-40ed-b54c-ac657f8495c5", "", "", "", "", 0],
    ]
    classes = [
        ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "No Lung Opacity / Not Normal"],
        ["00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity"],
        ["00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity"],
        ["003d8fa0-6bf1-40ed-b54c-ac657f8495c5", "Normal"],
    ]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], labels)
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    for i, patient in enumerate(sorted({row[0] for row in labels} | {"ffff0000-unlisted"})):
        write_dicom_2d(root / "stage_2_train_images" / f"{patient}.dcm", _gray(i, (16, 16)), patient)
    return root


def test_rsna_classes_boxes_and_pseudonymised_ids(tmp_path: Path) -> None:
    src = make_rsna(tmp_path / "rsna")
    found = discover("rsna", src)

    assert len(found.cases) == 3
    assert [r for _, r in found.excluded] == ["not listed in stage_2_train_labels.csv"]
    labels = {c.group_key: c.label for c in found.cases}
    assert labels == {
        "0004cfab-14fd-4e49-80ba-63a80b6bddd6": 1,
        "00436515-870c-4b36-a041-de91049b9ab4": 1,
        "003d8fa0-6bf1-40ed-b54c-ac657f8495c5": 0,
    }
    for case in found.cases:
        assert case.group_key not in case.id and case.group_key not in case.files[0].display
        assert case.id.startswith("rsna-h")
    rows = {c.group_key[:4]: c.load().items[0] for c in found.cases}
    opacity = rows["0043"].mask
    assert opacity.shape == (16, 16) and opacity.sum() == 5 * 3 + 2 * 2 and opacity[2:5, 4:9].all()
    assert rows["003d"].mask.sum() == 0  # Normal: an empty mask
    assert rows["0004"].mask is None  # Not Normal: no pixel annotation
    assert rows["0004"].image.patient_id is None
    dropped = discover("rsna", src, drop_not_normal=True)
    assert len(dropped.cases) == 2 and len(dropped.excluded) == 2


def test_rsna_missing_image_is_an_error(tmp_path: Path) -> None:
    src = make_rsna(tmp_path / "rsna")
    (src / "stage_2_train_images" / "003d8fa0-6bf1-40ed-b54c-ac657f8495c5.dcm").unlink()
    with pytest.raises(IngestError, match="stage_2_train_images/003d8fa0"):
        discover("rsna", src)


# --- folder ------------------------------------------------------------------------------------------


def make_folder(root: Path) -> Path:
    write_picture(root / "normal" / "p1" / "a.png", _gray(1))
    write_picture(root / "normal" / "p2" / "b.png", _gray(2))
    write_picture(root / "normal" / "c.png", _gray(3))
    write_picture(root / "abnormal" / "p1" / "d.png", _gray(4))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    write_picture(root / "masks" / "p1" / "d.png", mask)
    write_picture(root / "unlabeled" / "e.png", _gray(5))
    return root


def test_folder_labels_masks_and_groups(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "folder")
    write_picture(src / "masks" / "zz.png", np.zeros((4, 4), np.uint8))
    found = discover("folder", src)
    cases = by_id(found)

    assert {k: c.label for k, c in cases.items()} == {
        "normal/p1/a.png": 0,
        "normal/p2/b.png": 0,
        "normal/c.png": 0,
        "abnormal/p1/d.png": 1,
        "unlabeled/e.png": None,
    }
    assert cases["normal/p1/a.png"].group_key == cases["abnormal/p1/d.png"].group_key == "p1"
    assert cases["normal/c.png"].group_key == "c"
    assert [f.display for f in cases["abnormal/p1/d.png"].files] == ["abnormal/p1/d.png", "masks/p1/d.png"]
    assert [(s.display, r) for s, r in found.quarantined] == [
        ("masks/zz.png", "mask without a matching image")
    ]
    item = cases["abnormal/p1/d.png"].load().items[0]
    assert item.mask.sum() == 16 and item.mask.max() == 1
    regex = by_id(discover("folder", src, group_regex=r"^(?:p\d/)?(\w)"))
    assert regex["normal/p2/b.png"].group_key == "b"


def test_folder_groups_dicom_series_into_one_volume_by_patient(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    uid = generate_uid()
    for index in range(3):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(3 - index)]
        path = src / "abnormal" / "scan" / f"IM{index}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
    (src / "abnormal" / "scan" / "broken.dcm").write_bytes(b"not dicom at all" * 10)

    found = discover("folder", src)

    assert [c.id for c in found.cases] == ["abnormal/scan"]
    case = found.cases[0]
    assert len(case.files) == 3 and case.group_key == "patient:4MR1"
    assert [s.display for s, _ in found.quarantined] == ["abnormal/scan/broken.dcm"]
    item = case.load().items[0]
    # stored like NIfTI: canonical RAS (X, Y, Z); MR_small is axial, so Z (last) is the slice axis
    assert item.image.array.shape == (64, 64, 3) and item.image.meta["n_files"] == 3
    assert item.image.affine is not None and nib.aff2axcodes(item.image.affine) == ("R", "A", "S")


def test_folder_needs_a_class_folder(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="normal/, abnormal/ or unlabeled/"):
        discover("folder", tmp_path)


# --- every layout through ingest ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "make"),
    [
        ("mood", make_mood),
        ("brats", make_brats),
        ("chexpert", make_chexpert),
        ("zhanglab", make_zhanglab),
        ("mura", make_mura),
        ("rsna", make_rsna),
        ("folder", make_folder),
    ],
)
def test_every_layout_ingests_with_group_level_splits_and_balanced_files(
    tmp_path: Path, layout: str, make: Any
) -> None:
    import pyarrow.parquet as pq

    from medood.platform.data.ingest import ingest

    src = make(tmp_path / "src")
    report = ingest(layout, src, tmp_path / "out", salt="s", progress=False)

    rows = [
        row for shard in report.shards for row in pq.read_table(tmp_path / "out" / shard["path"]).to_pylist()
    ]
    assert len(rows) == report.rows > 0 and len({row["id"] for row in rows}) == len(rows)
    splits_of_group: dict[str, set[str]] = {}
    for row in rows:
        splits_of_group.setdefault(row["group"], set()).add(row["split"])
        assert row["dataset"] == layout
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    assert {row["label"] for row in rows if row["split"] == "train"} <= {0, None}
    rec = report.reconciliation
    assert rec["balanced"] and rec["files_seen"] == rec["files_in_rows"] + rec["files_quarantined"]
