"""Layouts: how each public release lays out its files, turned into cases that ingest reads.

A layout is selected by name (``get_layout("brats")``) and ``discover``s a source folder without
decoding pixels (DICOM headers and label files only). It returns ``Case``s, each naming the image
files it reads (they are the "files seen"), its patient key (hashed into ``group``), its label when
known before reading, and the official split pool it belongs to; ``Case.load()`` decodes the
files into one or more rows (BraTS: one row per axial slice). Label files (CSV, ``.txt``) are
listed separately and are not images; image files a layout deliberately does not use (another
BraTS modality, CheXpert lateral views, RSNA's unlabeled test images) are listed as excluded with
the reason.

Layouts and their options (``--option key=value``):

- ``mood`` (``region=brain|abdom``): ``{region}_train/`` normal volumes -> train;
  ``toy/`` (or ``{region}_toy/toy/``) cases with ``toy_label/pixel/<name>`` masks and
  ``toy_label/sample/<name>.txt`` 0/1 labels -> divided group-wise between val and test.
- ``brats`` (``modality=flair|t1|t1ce|t2``): BraTS2020 case folders; one row per axial slice of the
  chosen modality (RAS, slice = last axis), label 1 where ``seg`` > 0 on the slice, mask ``seg > 0``;
  slices that are all zero (no brain) are dropped by rule and counted.
- ``chexpert`` (``view=frontal|lateral|all``): ``train.csv`` -> train/val pool, ``valid.csv`` ->
  test; normal when ``No Finding`` is 1; group = ``patientXXXXX``.
- ``zhanglab``: ``train|test/NORMAL|PNEUMONIA/*.jpeg`` (and ``val/`` if present), official splits;
  group = ``personN`` or the ``IM-NNNN`` prefix, scoped to the official split folder.
- ``mura`` (``body_part=XR_HAND|...``, ``pooled=false``): ``train_image_paths.csv`` -> train/val pool,
  ``valid_image_paths.csv`` -> test; label from the study folder's ``_positive``/``_negative``;
  group = patient + body part. ``pooled=true`` is seed 004's protocol (§4.1, Fig. 6): both official
  sets are pooled and dealt by ``--split`` (the paper's 0.5 0.25 0.25), and units (patient + body
  part) holding both normal and abnormal studies go only to val / test.
- ``rsna`` (``drop_not_normal=false``): ``stage_2_train_labels.csv``,
  ``stage_2_detailed_class_info.csv`` and ``stage_2_train_images/<patientId>.dcm``; Normal -> 0,
  Lung Opacity -> 1 with its boxes as mask, "No Lung Opacity / Not Normal" -> 1 (no mask) or
  dropped; row ids and manifest paths use the salted hash of the patientId.
- ``folder`` (``group_regex=REGEX``): ``normal/``, ``abnormal/``, ``unlabeled/`` and ``masks/``
  (same relative names, under ``masks/`` or ``masks/<class>/``); DICOM slices of one series in one
  folder become one volume; group = DICOM PatientID, else the first sub-folder, else the file stem,
  or the first capture group of ``group_regex`` on the class-relative path.
"""

from __future__ import annotations

import csv
import inspect
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medood.platform.data.readers import (
    DEFAULT_MAX_VOXELS,
    ImageData,
    describe_error,
    group_dicom_files,
    image_format,
    read_dicom_series,
    read_image,
    read_mask,
    read_nifti,
)

POOLS = (None, "train", "trainval", "valtest", "val", "test")
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}


class IngestError(ValueError):
    """Input that ingest cannot quarantine around: a missing listed file, duplicate ids, a label
    file it cannot parse. The message names the file. (A bad image file is never one: it is
    quarantined.)"""


class UsageError(ValueError):
    """A bad argument (unknown layout or option, a bad option value): the CLI exits 2 on it."""


class MaskShapeError(ValueError):
    """A mask whose shape differs from its image's: the case is quarantined with this reason."""


@dataclass(frozen=True)
class SourceFile:
    """An input image file and the name the manifest shows for it (relative to the source folder)."""

    path: Path
    display: str


@dataclass
class Item:
    """One future row: the decoded image, its label and mask, and layout metadata."""

    id: str
    image: ImageData
    label: int | None
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseRows:
    """What ``Case.load`` returns: the rows and the rows dropped by a layout rule, per rule."""

    items: list[Item]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Case:
    """A unit of input: the files one load reads, and what is known about it before reading."""

    id: str
    group_key: str  # raw patient key; ingest stores only its salted hash
    files: list[SourceFile]
    load: Callable[[], CaseRows]
    label: int | None = None
    mixed: bool = False  # labels are per row and only known after loading (BraTS slices)
    pool: str | None = None  # official split pool, one of POOLS


@dataclass
class Discovery:
    """Everything a layout found under the source folder."""

    cases: list[Case] = field(default_factory=list)
    label_files: list[Path] = field(default_factory=list)
    excluded: list[tuple[Path, str]] = field(default_factory=list)
    quarantined: list[tuple[SourceFile, str]] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutContext:
    """What a layout needs besides its options: the source folder and the pseudonymiser."""

    src: Path
    pseudonymize: Callable[[str], str]
    max_voxels: int = DEFAULT_MAX_VOXELS  # images declaring more are refused from their header

    def source(self, path: Path) -> SourceFile:
        return SourceFile(path, relative(path, self.src))


@dataclass(frozen=True)
class Layout:
    """A named layout, its ``discover`` function and its options with their defaults."""

    name: str
    discover: Callable[..., Discovery]

    @property
    def options(self) -> dict[str, Any]:
        parameters = inspect.signature(self.discover).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def run(self, context: LayoutContext, **options: Any) -> Discovery:
        known = self.options
        for key in options:
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise UsageError(f"unknown option {key!r} for layout {self.name!r}; known: {allowed}")
        return self.discover(context, **options)


LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str) -> Callable[[Callable[..., Discovery]], Callable[..., Discovery]]:
    def decorate(discover: Callable[..., Discovery]) -> Callable[..., Discovery]:
        LAYOUTS[name] = Layout(name, discover)
        return discover

    return decorate


def get_layout(name: str) -> Layout:
    """The layout registered under ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in LAYOUTS:
        raise UsageError(f"unknown layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name]


# --- mood --------------------------------------------------------------------------------------------


@register_layout("mood")
def discover_mood(context: LayoutContext, *, region: str = "brain") -> Discovery:
    _check_choice("region", region, ("brain", "abdom"))
    src = context.src
    found = Discovery()
    train_dir = _first_dir(src / f"{region}_train" / f"{region}_train", src / f"{region}_train")
    toy_root = _first_dir(src / f"{region}_toy" / f"{region}_toy", src / f"{region}_toy", src, need="toy")
    if train_dir is None and toy_root is None:
        raise IngestError(
            f"no MOOD data under {src}: expected {region}_train/ and/or toy/ (or {region}_toy/toy/)"
        )
    if train_dir is not None:
        for path in list_files(train_dir):
            source = context.source(path)
            found.cases.append(
                Case(
                    id=source.display,
                    group_key=f"{region}_train/{_strip_suffix(path.name)}",
                    files=[source],
                    load=_single_loader(context, source, None, 0, source.display, {}),
                    label=0,
                    pool="train",
                )
            )
    if toy_root is None:
        return found
    toy_dir = toy_root / "toy"
    pixel_dir = toy_root / "toy_label" / "pixel"
    sample_dir = toy_root / "toy_label" / "sample"
    used_masks: set[Path] = set()
    for path in list_files(toy_dir):
        source = context.source(path)
        mask_path = pixel_dir / path.name
        mask = context.source(mask_path) if mask_path.is_file() else None
        if mask is not None:
            used_masks.add(mask_path)
        label: int | None = None
        for sample in (sample_dir / f"{path.name}.txt", sample_dir / f"{_strip_suffix(path.name)}.txt"):
            if sample.is_file():
                found.label_files.append(sample)
                label = _read_sample_label(sample)
                break
        files = [source] + ([mask] if mask is not None else [])
        if label is None and mask is not None:
            try:  # no sample label: a case is abnormal when its pixel mask has any voxel set
                label = int(read_mask(mask.path, max_voxels=context.max_voxels).any())
            except Exception as error:
                found.quarantined.extend((f, f"mask {mask.display}: {describe_error(error)}") for f in files)
                continue
        found.cases.append(
            Case(
                id=source.display,
                group_key=f"toy/{_strip_suffix(path.name)}",
                files=files,
                load=_single_loader(context, source, mask, label, source.display, {}),
                label=label,
                pool="valtest",
            )
        )
    for path in list_files(pixel_dir):
        if path not in used_masks:
            found.quarantined.append((context.source(path), "mask without a matching image in toy/"))
    consumed = set(found.label_files)
    found.label_files.extend(path for path in list_files(sample_dir) if path not in consumed)
    return found


def _read_sample_label(path: Path) -> int:
    text = path.read_text().strip()
    try:
        value = float(text)
    except ValueError:
        raise IngestError(f"{path}: sample label must be 0 or 1, got {text[:40]!r}") from None
    if value not in (0.0, 1.0):
        raise IngestError(f"{path}: sample label must be 0 or 1, got {text[:40]!r}")
    return int(value)


# --- brats -------------------------------------------------------------------------------------------

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
_BRATS_FILE = re.compile(r"^(?P<case>.+)_(?P<kind>t1ce|t1|t2|flair|seg)\.nii(\.gz)?$")


@register_layout("brats")
def discover_brats(context: LayoutContext, *, modality: str = "flair") -> Discovery:
    _check_choice("modality", modality, BRATS_MODALITIES)
    found = Discovery()
    cases: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for path in list_files(context.src):
        match = _BRATS_FILE.match(path.name)
        if match:
            cases[(path.parent, match["case"])][match["kind"]] = path
    if not cases:
        raise IngestError(
            f"no BraTS files under {context.src}: expected <case>/<case>_{{{','.join(BRATS_MODALITIES)},seg}}.nii.gz"
        )
    for (_, name), kinds in sorted(cases.items()):
        for kind, path in kinds.items():
            if kind not in (modality, "seg"):
                found.excluded.append((path, f"modality {kind!r} not selected (modality={modality})"))
        seg = context.source(kinds["seg"]) if "seg" in kinds else None
        if modality not in kinds:
            if seg is not None:
                found.quarantined.append((seg, f"case {name} has no {modality} image"))
            continue
        image = context.source(kinds[modality])
        found.cases.append(
            Case(
                id=image.display,
                group_key=name,
                files=[image] + ([seg] if seg is not None else []),
                load=_brats_loader(image, seg, modality, context.max_voxels),
                label=None,
                mixed=seg is not None,
            )
        )
    return found


def _brats_loader(
    image: SourceFile, seg: SourceFile | None, modality: str, max_voxels: int
) -> Callable[[], CaseRows]:
    def load() -> CaseRows:
        volume = read_nifti(image.path, max_voxels=max_voxels)
        labels = None
        if seg is not None:
            try:
                labels = read_nifti(seg.path, max_voxels=max_voxels).array
            except Exception as error:
                raise ValueError(f"mask {seg.display}: {describe_error(error)}") from error
            _check_mask_shape(seg, labels.shape, image, volume.array.shape)
        if volume.array.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {volume.array.shape}")
        items: list[Item] = []
        dropped = 0
        affine = volume.affine if volume.affine is not None else np.eye(4)
        for z in range(volume.array.shape[2]):
            plane = np.ascontiguousarray(volume.array[:, :, z])
            if not plane.any():
                dropped += 1
                continue
            mask = None if labels is None else (labels[:, :, z] != 0).astype(np.uint8)
            slice_affine = affine.copy()
            slice_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(z)]) + affine[:3, 3]
            spacing = None if volume.spacing is None else tuple(volume.spacing[:2])
            data = ImageData(plane, spacing, slice_affine, dict(volume.meta))
            items.append(
                Item(
                    id=f"{image.display}#z{z:03d}",
                    image=data,
                    label=None if mask is None else int(mask.any()),
                    mask=mask,
                    meta={"modality": modality, "slice": z, "axis": "axial"},
                )
            )
        rule = "brats: slice without brain (all zero)"
        return CaseRows(items, {rule: dropped} if dropped else {})

    return load


# --- chexpert ----------------------------------------------------------------------------------------


@register_layout("chexpert")
def discover_chexpert(context: LayoutContext, *, view: str = "frontal") -> Discovery:
    _check_choice("view", view, ("frontal", "lateral", "all"))
    root = _find_dir_with(context.src, ("train.csv", "valid.csv"))
    if root is None:
        raise IngestError(f"no CheXpert train.csv or valid.csv under {context.src}")
    found = Discovery()
    for csv_name, pool in (("train.csv", "trainval"), ("valid.csv", "test")):
        table = root / csv_name
        if not table.is_file():
            continue
        found.label_files.append(table)
        for number, row in _read_csv_rows(table, ("Path", "Frontal/Lateral", "No Finding")):
            path = _resolve_listed(row["Path"], root, table, number)
            if view != "all" and row["Frontal/Lateral"].strip().lower() != view:
                found.excluded.append(
                    (path, f"view {row['Frontal/Lateral'].strip()!r} not selected (view={view})")
                )
                continue
            source = context.source(path)
            label = 0 if _is_one(row["No Finding"]) else 1
            patient = re.search(r"patient\d+", row["Path"])
            meta = {"view": row["Frontal/Lateral"].strip().lower()}
            found.cases.append(
                Case(
                    id=source.display,
                    group_key=patient.group(0) if patient else _strip_suffix(path.name),
                    files=[source],
                    load=_single_loader(context, source, None, label, source.display, meta),
                    label=label,
                    pool=pool,
                )
            )
    return found


# --- zhanglab ----------------------------------------------------------------------------------------

_ZHANGLAB_POOLS = {"train": "trainval", "val": "val", "test": "test"}
_ZHANGLAB_CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}


@register_layout("zhanglab")
def discover_zhanglab(context: LayoutContext) -> Discovery:
    root = _find_dir_with(context.src, ("train", "test"), need_dir=True, within=("NORMAL", "PNEUMONIA"))
    if root is None:
        raise IngestError(f"no ZhangLab folders under {context.src}: expected train|test/NORMAL|PNEUMONIA/")
    found = Discovery()
    for split, pool in _ZHANGLAB_POOLS.items():
        for class_name, label in _ZHANGLAB_CLASSES.items():
            for path in list_files(root / split / class_name):
                source = context.source(path)
                stem = _strip_suffix(path.name)
                person = re.search(r"person\d+", stem, re.IGNORECASE)
                patient = person.group(0).lower() if person else re.sub(r"-\d+$", "", stem)
                found.cases.append(
                    Case(
                        id=source.display,
                        group_key=f"{split}/{patient}",
                        files=[source],
                        load=_single_loader(context, source, None, label, source.display, {}),
                        label=label,
                        pool=pool,
                    )
                )
    return found


# --- mura --------------------------------------------------------------------------------------------

MURA_BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")


@register_layout("mura")
def discover_mura(context: LayoutContext, *, body_part: str | None = None, pooled: bool = False) -> Discovery:
    if not isinstance(pooled, bool):
        raise UsageError(f"pooled must be true or false, got {pooled!r}")
    if body_part is not None:
        body_part = body_part.upper() if body_part.upper().startswith("XR_") else f"XR_{body_part.upper()}"
        _check_choice("body_part", body_part, MURA_BODY_PARTS)
    root = _find_dir_with(context.src, ("train_image_paths.csv", "valid_image_paths.csv"))
    if root is None:
        raise IngestError(f"no MURA train_image_paths.csv or valid_image_paths.csv under {context.src}")
    found = Discovery()
    for csv_name, pool in (("train_image_paths.csv", "trainval"), ("valid_image_paths.csv", "test")):
        table = root / csv_name
        if not table.is_file():
            continue
        found.label_files.append(table)
        with open(table, newline="", encoding="utf-8-sig") as handle:
            lines = [
                (n, r[0].strip()) for n, r in enumerate(csv.reader(handle), start=1) if r and r[0].strip()
            ]
        for number, listed in lines:
            if "/" not in listed:
                continue  # a header line
            path = _resolve_listed(listed, root, table, number)
            parts = Path(listed).parts
            part = next((p for p in parts if p.startswith("XR_")), None)
            patient = next((p for p in parts if p.startswith("patient")), None)
            study = next((p for p in parts if p.startswith("study")), "")
            if part is None or patient is None or not study.endswith(("_positive", "_negative")):
                raise IngestError(
                    f"{table} line {number}: cannot read body part/patient/study label from {listed!r}"
                )
            if body_part is not None and part != body_part:
                found.excluded.append((path, f"body part {part} not selected (body_part={body_part})"))
                continue
            label = 1 if study.endswith("_positive") else 0
            source = context.source(path)
            found.cases.append(
                Case(
                    id=source.display,
                    group_key=f"{patient}/{part}",
                    files=[source],
                    load=_single_loader(context, source, None, label, source.display, {"body_part": part}),
                    label=label,
                    pool=None if pooled else pool,
                )
            )
    if pooled:  # seed 004 Fig. 6: mixed units (normal and abnormal studies) only in val / test
        labels: dict[str, set[int | None]] = {}
        for case in found.cases:
            labels.setdefault(case.group_key, set()).add(case.label)
        for case in found.cases:
            if labels[case.group_key] == {0, 1}:
                case.pool = "valtest"
    return found


# --- rsna --------------------------------------------------------------------------------------------

RSNA_CLASSES = {"Normal": 0, "Lung Opacity": 1, "No Lung Opacity / Not Normal": 1}
RSNA_NOT_NORMAL = "No Lung Opacity / Not Normal"


@register_layout("rsna")
def discover_rsna(context: LayoutContext, *, drop_not_normal: bool = False) -> Discovery:
    if not isinstance(drop_not_normal, bool):
        raise UsageError(f"drop_not_normal must be true or false, got {drop_not_normal!r}")
    root = _find_dir_with(context.src, ("stage_2_train_labels.csv",))
    if root is None:
        raise IngestError(f"no RSNA stage_2_train_labels.csv under {context.src}")
    labels_csv = root / "stage_2_train_labels.csv"
    classes_csv = root / "stage_2_detailed_class_info.csv"
    if not classes_csv.is_file():
        raise IngestError(f"{classes_csv} not found: the rsna layout needs it next to {labels_csv.name}")
    images_dir = root / "stage_2_train_images"
    found = Discovery(label_files=[labels_csv, classes_csv])
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for number, row in _read_csv_rows(labels_csv, ("patientId", "x", "y", "width", "height", "Target")):
        patient_boxes = boxes.setdefault(row["patientId"].strip(), [])
        if _is_one(row["Target"]):
            try:
                patient_boxes.append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
            except ValueError:
                raise IngestError(f"{labels_csv} line {number}: bad box {row}") from None
    classes: dict[str, str] = {}
    for number, row in _read_csv_rows(classes_csv, ("patientId", "class")):
        name = row["class"].strip()
        if name not in RSNA_CLASSES:
            raise IngestError(
                f"{classes_csv} line {number}: unknown class {name!r}; known: {', '.join(RSNA_CLASSES)}"
            )
        classes[row["patientId"].strip()] = name
    for patient in sorted(boxes):
        path = images_dir / f"{patient}.dcm"
        if not path.is_file():
            raise IngestError(f"{labels_csv.name}: image for a listed patientId not found: {path}")
        name = classes.get(patient)
        if name is None:
            raise IngestError(
                f"{classes_csv.name}: no class for a patientId listed in {labels_csv.name} ({path})"
            )
        if name == RSNA_NOT_NORMAL and drop_not_normal:
            found.excluded.append((path, f"class {RSNA_NOT_NORMAL!r} dropped (drop_not_normal=true)"))
            continue
        alias = context.pseudonymize(patient)
        source = SourceFile(path, f"{relative(images_dir, context.src)}/{alias}.dcm")
        label = RSNA_CLASSES[name]
        found.cases.append(
            Case(
                id=f"rsna-{alias}",
                group_key=patient,
                files=[source],
                load=_rsna_loader(source, f"rsna-{alias}", name, boxes[patient], context.max_voxels),
                label=label,
            )
        )
    listed = set(boxes)
    for path in list_files(images_dir):
        if _strip_suffix(path.name) not in listed:
            found.excluded.append((path, f"not listed in {labels_csv.name}"))
    return found


def _rsna_loader(
    source: SourceFile,
    row_id: str,
    class_name: str,
    boxes: list[tuple[float, float, float, float]],
    max_voxels: int,
) -> Callable[[], CaseRows]:
    def load() -> CaseRows:
        image = read_image(source.path, max_voxels=max_voxels)
        image.patient_id = None
        if image.array.ndim != 2:
            raise ValueError(f"expected a 2D radiograph, got shape {image.array.shape}")
        mask = None
        # "Not Normal" has no pixel annotation: no mask, rather than an empty one claiming no anomaly
        if class_name != RSNA_NOT_NORMAL:
            mask = np.zeros(image.array.shape, dtype=np.uint8)
            for x, y, width, height in boxes:
                top, left = max(int(np.floor(y)), 0), max(int(np.floor(x)), 0)
                mask[top : int(np.ceil(y + height)), left : int(np.ceil(x + width))] = 1
        label = RSNA_CLASSES[class_name]
        return CaseRows([Item(row_id, image, label, mask, {"class": class_name, "boxes": len(boxes)})])

    return load


# --- folder ------------------------------------------------------------------------------------------

FOLDER_CLASSES = {"normal": 0, "abnormal": 1, "unlabeled": None}


@register_layout("folder")
def discover_folder(context: LayoutContext, *, group_regex: str | None = None) -> Discovery:
    src = context.src
    pattern = None
    if group_regex is not None:
        try:
            pattern = re.compile(group_regex)
        except re.error as error:
            raise UsageError(
                f"group_regex {group_regex!r} is not a valid regular expression: {error}"
            ) from None
    class_dirs = {name: src / name for name in FOLDER_CLASSES if (src / name).is_dir()}
    if not class_dirs:
        raise IngestError(f"the folder layout needs normal/, abnormal/ or unlabeled/ under {src}")
    masks_dir = src / "masks"
    found = Discovery()
    used_masks: set[Path] = set()
    # abnormal first: a mask under masks/ (not masks/<class>/) whose name exists in several class
    # folders belongs to the abnormal image, not to a normal image of the same name
    for class_name in sorted(class_dirs, key=("abnormal", "unlabeled", "normal").index):
        class_dir = class_dirs[class_name]
        label = FOLDER_CLASSES[class_name]
        files = list_files(class_dir)
        dicom_files = [p for p in files if image_format(p) == "dicom"]
        units, failures = group_dicom_files(dicom_files, max_voxels=context.max_voxels)
        found.quarantined.extend((context.source(p), reason) for p, reason in failures)
        entries: list[tuple[list[Path], str | None, bool]] = [
            (u.files, u.patient_id, u.is_series) for u in units
        ]
        entries += [([p], None, False) for p in files if image_format(p) != "dicom"]
        series_per_dir: dict[Path, int] = defaultdict(int)
        for paths, _, is_series in entries:
            if is_series:
                series_per_dir[paths[0].parent] += 1
        for paths, patient_id, is_series in sorted(entries, key=lambda e: e[0][0]):
            sources = [context.source(p) for p in paths]
            within = paths[0].relative_to(class_dir)
            if is_series:
                folder = relative(paths[0].parent, src)
                case_id = folder if series_per_dir[paths[0].parent] == 1 else f"{sources[0].display}#series"
                folder_key = (
                    within.parent.as_posix() if within.parent != Path(".") else _strip_suffix(within.name)
                )
                group_key = _folder_group(pattern, within.parent.as_posix(), patient_id, folder_key)
                load = _series_loader(sources, case_id, label, context.max_voxels)
            else:
                case_id = sources[0].display
                mask_path = _find_mask(masks_dir, class_name, within, used_masks)
                mask = None
                if mask_path is not None:
                    used_masks.add(mask_path)
                    mask = context.source(mask_path)
                    sources.append(mask)
                default = within.parts[0] if len(within.parts) > 1 else _strip_suffix(within.name)
                group_key = _folder_group(pattern, within.as_posix(), patient_id, default)
                load = _single_loader(context, sources[0], mask, label, case_id, {})
            found.cases.append(Case(case_id, group_key, sources, load, label=label))
    for path in list_files(masks_dir):
        if path not in used_masks:
            found.quarantined.append((context.source(path), "mask without a matching image"))
    return found


def _folder_group(pattern: re.Pattern[str] | None, within: str, patient_id: str | None, default: str) -> str:
    if pattern is not None:
        match = pattern.search(within)
        if match is None:
            raise IngestError(f"group_regex {pattern.pattern!r} does not match {within!r}")
        return match.group(1) if match.groups() else match.group(0)
    return f"patient:{patient_id}" if patient_id else default


def _find_mask(masks_dir: Path, class_name: str, within: Path, taken: set[Path]) -> Path | None:
    """``masks/<class>/<rel>`` or ``masks/<rel>`` (same name, or same stem in another image format)."""
    stem = _strip_suffix(within.name)
    for base in (masks_dir / class_name, masks_dir):
        folder = (base / within).parent
        if not folder.is_dir():
            continue
        exact = base / within
        candidates = [exact] + [
            c
            for c in sorted(folder.iterdir())
            if c != exact and _strip_suffix(c.name) == stem and image_format(c)
        ]
        for candidate in candidates:
            if candidate.is_file() and candidate not in taken:
                return candidate
    return None


def _series_loader(
    sources: list[SourceFile], case_id: str, label: int | None, max_voxels: int
) -> Callable[[], CaseRows]:
    def load() -> CaseRows:
        image = read_dicom_series([s.path for s in sources], max_voxels=max_voxels)
        image.patient_id = None
        return CaseRows([Item(case_id, image, label, None, {})])

    return load


# --- shared helpers ----------------------------------------------------------------------------------


def list_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (recursive, sorted), without hidden and OS bookkeeping files."""
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.rglob("*")):
        relative_parts = path.relative_to(folder).parts
        if is_hidden(relative_parts) or not path.is_file():
            continue
        files.append(path)
    return files


def is_hidden(parts: Iterable[str]) -> bool:
    """Dot-files, ``__MACOSX`` and OS thumbnails: never data."""
    return any(p.startswith(".") or p == "__MACOSX" or p.lower() in SYSTEM_FILES for p in parts)


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form (the absolute path if it is outside)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _single_loader(
    context: LayoutContext,
    source: SourceFile,
    mask: SourceFile | None,
    label: int | None,
    row_id: str,
    meta: dict[str, Any],
) -> Callable[[], CaseRows]:
    max_voxels = context.max_voxels

    def load() -> CaseRows:
        image = read_image(source.path, max_voxels=max_voxels)
        mask_array = None
        if mask is not None:
            try:
                mask_array = read_mask(mask.path, max_voxels=max_voxels)
            except Exception as error:
                raise ValueError(f"mask {mask.display}: {describe_error(error)}") from error
            _check_mask_shape(mask, mask_array.shape, source, image.array.shape)
        return CaseRows([Item(row_id, image, label, mask_array, dict(meta))])

    return load


def _check_mask_shape(
    mask: SourceFile, mask_shape: tuple[int, ...], image: SourceFile, shape: tuple[int, ...]
) -> None:
    if tuple(mask_shape) != tuple(shape):
        raise MaskShapeError(
            f"mask {mask.display} has shape {tuple(mask_shape)} but its image {image.display} has shape {tuple(shape)}"
        )


def _check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")


def _strip_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _first_dir(*candidates: Path, need: str | None = None) -> Path | None:
    for candidate in candidates:
        target = candidate / need if need else candidate
        if target.is_dir():
            return candidate
    return None


def _find_dir_with(
    src: Path, names: tuple[str, ...], *, need_dir: bool = False, within: tuple[str, ...] = ()
) -> Path | None:
    """``src`` or the shallowest folder below it (up to 3 levels) holding one of ``names``."""
    frontier = [src]
    for _ in range(4):
        for folder in frontier:
            for name in names:
                target = folder / name
                if (
                    need_dir
                    and target.is_dir()
                    and (not within or any((target / w).is_dir() for w in within))
                ):
                    return folder
                if not need_dir and target.is_file():
                    return folder
        frontier = [
            child
            for folder in frontier
            for child in sorted(folder.iterdir())
            if child.is_dir() and not is_hidden([child.name])
        ]
    return None


def _read_csv_rows(table: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise IngestError(f"{table}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        return [(number, row) for number, row in enumerate(reader, start=2)]


def _resolve_listed(listed: str, root: Path, table: Path, number: int) -> Path:
    """A path from a release's CSV: relative to its folder, its parent, or without the release prefix."""
    relative_path = Path(listed.strip())
    candidates = [root / relative_path, root.parent / relative_path]
    if len(relative_path.parts) > 1:
        candidates.append(root / Path(*relative_path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise IngestError(f"{table} line {number}: listed image {listed!r} not found (looked under {root})")


def _is_one(value: str | None) -> bool:
    try:
        return float(value or "nan") == 1.0
    except ValueError:
        return False
