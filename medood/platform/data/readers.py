"""Readers that turn one medical image file (or one DICOM series) into an array plus its geometry.

- NIfTI (``.nii``, ``.nii.gz``, nibabel): reoriented to the closest canonical (RAS+) orientation with
  ``nibabel.as_closest_canonical``; the array is indexed (X, Y, Z) and ``affine``/``spacing`` are
  those of the reoriented image.
- DICOM (pydicom): single files (2D, or multi-frame as (frames, rows, cols)) and series of
  single-frame slices sharing a SeriesInstanceUID, sorted by ImagePositionPatient projected on the
  slice normal and stacked as (slices, rows, cols). RescaleSlope/Intercept are applied (int16 when
  the result is integral and fits, else float32); MONOCHROME1 is inverted so that brighter always
  means more signal; colour is converted to gray. The affine maps (slice, row, col) indices to RAS
  millimetres (DICOM's LPS with x and y negated), so maps can be written back as NIfTI. Compressed
  transfer syntaxes decode wherever an installed pydicom plugin (pylibjpeg, Pillow) can; otherwise
  the reader raises with pydicom's message, which ingest records as the quarantine reason.
- 2D pictures (PNG, JPEG, BMP, TIFF; Pillow): 8-bit gray stays uint8, 16-bit gray stays uint16,
  colour (RGB, RGBA, palette) becomes 8-bit luma.

Arrays keep the dtype they were stored with (uint8, int16, uint16, float32, ...); only float64 and
int64 are narrowed to float32 / int32. ``ImageData.patient_id`` carries the DICOM PatientID for
grouping only; it is never written anywhere (ingest hashes it).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medood.platform.data.privacy import dicom_meta

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class UnsupportedFormatError(ValueError):
    """The file is not in a format any reader handles."""


@dataclass
class ImageData:
    """One decoded image or volume with its geometry and whitelisted metadata."""

    array: np.ndarray
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None
    n_files: int = 1


@dataclass
class DicomUnit:
    """DICOM files that make one row: a single file, or the slices of one series."""

    files: list[Path]
    patient_id: str | None
    is_series: bool


def image_format(path: Path) -> str | None:
    """``"nifti"``, ``"dicom"`` or ``"picture"`` from the name (and the DICOM preamble), else None."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    if "." not in name and is_dicom_file(path):
        return "dicom"
    return None


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> ImageData:
    """Read any supported single file; raises ``UnsupportedFormatError`` for other formats."""
    path = Path(path)
    kind = image_format(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "dicom":
        return read_dicom(path)
    if kind == "picture":
        return read_picture(path)
    suffix = "".join(path.suffixes[-2:]) or "(no extension)"
    raise UnsupportedFormatError(
        f"unsupported file type {suffix!r}; supported: .nii, .nii.gz, DICOM, .png, .jpg, .jpeg, .bmp, .tif"
    )


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as uint8 {0, 1} (any non-zero label counts as abnormal)."""
    return (read_image(path).array != 0).astype(np.uint8)


# --- NIfTI -------------------------------------------------------------------------------------------


def read_nifti(path: str | Path) -> ImageData:
    """A NIfTI volume reoriented to closest canonical RAS+, in its stored dtype."""
    import nibabel as nib

    image = nib.load(str(path))
    canonical = nib.as_closest_canonical(image)
    array = _narrow_dtype(np.asanyarray(canonical.dataobj))
    zooms = canonical.header.get_zooms()[: array.ndim]
    return ImageData(
        array=array,
        spacing=tuple(float(z) for z in zooms),
        affine=np.asarray(canonical.affine, dtype=np.float64),
        meta={"format": "nifti"},
    )


# --- DICOM -------------------------------------------------------------------------------------------


def read_dicom_header(path: str | Path) -> Any:
    """The header of a DICOM image file without its pixel data; raises if it is not a DICOM image."""
    import pydicom

    dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise ValueError("not a DICOM image (no Rows/Columns)")
    return dataset


def group_dicom_files(paths: Sequence[Path]) -> tuple[list[DicomUnit], list[tuple[Path, str]]]:
    """Group DICOM files into rows: slices of one series in one folder become one volume.

    A file joins a series when it is single-frame and has SeriesInstanceUID, ImagePositionPatient
    and ImageOrientationPatient; other files (radiographs, multi-frame) are rows of their own.
    Returns the units and the files whose header could not be read, with the reason.
    """
    failures: list[tuple[Path, str]] = []
    series: dict[tuple[str, str], list[tuple[Path, str | None]]] = defaultdict(list)
    singles: list[DicomUnit] = []
    for path in sorted(paths):
        try:
            header = read_dicom_header(path)
        except Exception as error:  # any unreadable header is quarantined with its message
            failures.append((path, describe_error(error)))
            continue
        patient_id = str(header.get("PatientID") or "") or None
        frames = int(header.get("NumberOfFrames") or 1)
        uid = header.get("SeriesInstanceUID")
        if frames == 1 and uid and "ImagePositionPatient" in header and "ImageOrientationPatient" in header:
            series[(str(path.parent), str(uid))].append((path, patient_id))
        else:
            singles.append(DicomUnit([path], patient_id, is_series=False))
    units = list(singles)
    for members in series.values():
        files = [p for p, _ in members]
        patient_id = members[0][1]
        units.append(DicomUnit(files, patient_id, is_series=len(files) > 1))
    units.sort(key=lambda unit: unit.files[0])
    return units, failures


def read_dicom(path: str | Path) -> ImageData:
    """One DICOM file: (rows, cols) for a single frame, (frames, rows, cols) for multi-frame."""
    import pydicom

    dataset = pydicom.dcmread(str(path), force=True)
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise ValueError("DICOM file has no pixel data")
    array = _dicom_pixels(dataset)
    frames = int(dataset.get("NumberOfFrames") or 1)
    meta = dicom_meta(dataset)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        meta["inverted_monochrome1"] = True
    row_spacing, col_spacing = _pixel_spacing(dataset)
    spacing: tuple[float, ...] | None = None
    affine = None
    if frames > 1 and array.ndim == 3:
        slice_spacing, affine = _multiframe_geometry(dataset, frames, row_spacing, col_spacing)
        if row_spacing is not None:
            spacing = (slice_spacing or 1.0, row_spacing, col_spacing)
    elif row_spacing is not None:
        spacing = (row_spacing, col_spacing)
    return ImageData(
        array=array,
        spacing=spacing,
        affine=affine,
        meta=meta,
        patient_id=str(dataset.get("PatientID") or "") or None,
    )


def read_dicom_series(paths: Sequence[str | Path]) -> ImageData:
    """Single-frame slices of one series stacked as (slices, rows, cols), sorted along the normal."""
    import pydicom

    if len(paths) == 1:
        return read_dicom(paths[0])
    slices = [pydicom.dcmread(str(p), force=True) for p in paths]
    first = slices[0]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in zip(paths, slices, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ValueError(f"inconsistent series: {Path(path).name} is {ds.Rows}x{ds.Columns}, not {shape}")
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, orientation, atol=1e-4):
            raise ValueError(f"inconsistent series: {Path(path).name} has another ImageOrientationPatient")
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, col_cosine)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    gaps = np.diff(sorted_distances)
    if np.any(gaps < 1e-4):
        raise ValueError("inconsistent series: two slices share one ImagePositionPatient")
    planes = [_dicom_pixels(slices[i]) for i in order]
    dtypes = {plane.dtype for plane in planes}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    volume = np.stack([plane.astype(dtype, copy=False) for plane in planes])
    slice_spacing = float(np.median(gaps))
    row_spacing, col_spacing = _pixel_spacing(first)
    row_spacing = row_spacing or 1.0
    col_spacing = col_spacing or 1.0
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    affine = _lps_to_ras(step, col_cosine * row_spacing, row_cosine * col_spacing, positions[order[0]])
    meta = dicom_meta(first)
    meta["n_files"] = len(paths)
    if first.get("PhotometricInterpretation") == "MONOCHROME1":
        meta["inverted_monochrome1"] = True
    if np.ptp(gaps) > 0.01 * slice_spacing:
        meta["irregular_slice_spacing"] = True
    return ImageData(
        array=volume,
        spacing=(slice_spacing, row_spacing, col_spacing),
        affine=affine,
        meta=meta,
        patient_id=str(first.get("PatientID") or "") or None,
        n_files=len(paths),
    )


# --- 2D pictures -------------------------------------------------------------------------------------


def read_picture(path: str | Path) -> ImageData:
    """A PNG/JPEG/BMP/TIFF as a 2D gray array (uint8, uint16, int32 or float32)."""
    from PIL import Image

    with Image.open(path) as picture:
        if getattr(picture, "n_frames", 1) > 1:
            raise UnsupportedFormatError(f"multi-frame {picture.format} images are not supported")
        picture.load()
        mode = picture.mode
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            array = np.asarray(picture)
        elif mode == "LA":
            array = np.asarray(picture.getchannel("L"))
        else:  # 1, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV: luma (ITU-R 601-2) as 8-bit gray
            array = np.asarray(picture.convert("L"))
    array = np.array(array, dtype=array.dtype.newbyteorder("="), copy=True)
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    return ImageData(
        array=_narrow_dtype(array), meta={"format": picture.format.lower() if picture.format else "picture"}
    )


# --- helpers -----------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """A one-line reason for the quarantine list: the exception type and its message."""
    message = " ".join(str(error).split())
    if len(message) > 500:
        message = message[:497] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _narrow_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float64 or array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.int64 or array.dtype == np.uint64:
        if array.size and array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
        return array.astype(np.float32)
    return array


def _dicom_pixels(dataset: Any) -> np.ndarray:
    """Decoded pixels with the modality LUT (rescale) applied, MONOCHROME1 inverted, colour to gray."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = dataset.pixel_array
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if samples == 3 and raw.shape[-1] == 3:
        # pydicom returns RGB (YBR is converted by default); ITU-R 601-2 luma, as Pillow's "L".
        raw = np.round(raw[..., 0] * 0.299 + raw[..., 1] * 0.587 + raw[..., 2] * 0.114).astype(raw.dtype)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        raw = (raw.max() + raw.min() - raw.astype(np.int64)).astype(raw.dtype)
    slope = float(dataset.get("RescaleSlope") or 1.0)
    intercept = float(dataset.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept == 0.0:
        return _narrow_dtype(np.asarray(raw))
    if float(slope).is_integer() and float(intercept).is_integer():
        values = raw.astype(np.int64) * int(slope) + int(intercept)
        info = np.iinfo(np.int16)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(np.int16)
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


def _pixel_spacing(dataset: Any) -> tuple[float | None, float | None]:
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    if spacing is None:
        shared = _functional_group(dataset, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
        spacing = None if shared is None else shared.get("PixelSpacing")
    if spacing is None or len(spacing) < 2:
        return None, None
    return float(spacing[0]), float(spacing[1])


def _functional_group(dataset: Any, sequence: str, item: str, index: int = 0) -> Any:
    groups = dataset.get(sequence)
    if not groups or len(groups) <= index:
        return None
    inner = groups[index].get(item)
    return inner[0] if inner else None


def _multiframe_geometry(
    dataset: Any, frames: int, row_spacing: float | None, col_spacing: float | None
) -> tuple[float | None, np.ndarray | None]:
    """Slice spacing and affine of a multi-frame file when its frames form an even stack."""
    orientation = dataset.get("ImageOrientationPatient")
    if orientation is None:
        plane = _functional_group(dataset, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence")
        orientation = None if plane is None else plane.get("ImageOrientationPatient")
    positions = []
    for index in range(frames):
        plane = _functional_group(dataset, "PerFrameFunctionalGroupsSequence", "PlanePositionSequence", index)
        if plane is None or "ImagePositionPatient" not in plane:
            break
        positions.append([float(v) for v in plane.ImagePositionPatient])
    fallback = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness")
    fallback_spacing = float(fallback) if fallback else None
    if orientation is None or len(positions) != frames or row_spacing is None:
        return fallback_spacing, None
    cosines = np.asarray([float(v) for v in orientation], dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    points = np.asarray(positions)
    gaps = np.diff(points @ normal)
    if frames < 2 or np.any(gaps <= 1e-4) or np.ptp(gaps) > 0.01 * float(np.median(gaps)):
        return fallback_spacing, None
    step = (points[-1] - points[0]) / (frames - 1)
    affine = _lps_to_ras(step, cosines[3:] * row_spacing, cosines[:3] * col_spacing, points[0])
    return float(np.median(gaps)), affine


def _lps_to_ras(axis0: np.ndarray, axis1: np.ndarray, axis2: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 affine from index (i, j, k) to RAS mm, given DICOM (LPS) steps per index and origin."""
    affine = np.eye(4)
    affine[:3, 0] = axis0
    affine[:3, 1] = axis1
    affine[:3, 2] = axis2
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
