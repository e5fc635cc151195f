"""One byte-level reader for every image medood takes in: ingest and serving both call it.

``read_bytes(data, format=None, max_voxels=DEFAULT_MAX_VOXELS)`` turns the bytes of one file into an
``ImageData`` (array, affine, spacing, whitelisted technical metadata). The format is sniffed from
the magic bytes (``sniff_format``); the optional hint (from a file name or a Content-Type) is used
only where the bytes carry no signature (a DICOM data set without its 128-byte preamble). Every
failure is an ``ImageReadError`` whose message is safe to store and show: it names the format,
the failing check or the DICOM tag (keyword and number), never a header value, since header
values can carry patient identity (pydicom's own messages are scrubbed of the file's identity
values, and its warnings and log records are silenced while medood reads). The subclasses say
what was wrong, and serving maps them to HTTP statuses:

- ``CorruptImageError``: truncated, corrupt, or a header value the reader needs that does not
  parse (``HeaderValueError``, which names the tag);
- ``UnsupportedFormatError``: not a format medood reads, or a DICOM transfer syntax with no
  installed decoder;
- ``ImageTooLargeError``: the header declares more than ``max_voxels`` voxels (checked before any
  pixel is decoded or decompressed: decompression bombs are refused from the header), or the file
  is larger than any image within the limit could be;
- ``NoImageError``: a DICOM object without pixel data (a structured report, an RT plan);
- ``DimensionalityError``: an image that is neither 2D nor 3D (4D NIfTI, 1D).

``DEFAULT_MAX_VOXELS`` is the one limit setting: ``medood ingest --max-voxels`` and ``medood serve
--max-voxels`` default to it.

Orientation: every 3D volume is stored in one canonical orientation, the closest to RAS+
(nibabel's ``as_closest_canonical``), indexed (X, Y, Z) with the affine mapping indices to RAS
millimetres and ``spacing`` the voxel sizes along those axes. So a 2D model's ``slice_axis`` means
the same anatomical axis for a NIfTI volume and a DICOM series, and maps written back with the
affine land where they belong.

- NIfTI-1/2 (``.nii``, ``.nii.gz``): reoriented as above. 2D NIfTI images are kept as stored.
- DICOM: a single-frame file is a 2D image (rows, cols) with its PixelSpacing. A series of
  single-frame slices (``read_dicom_series``) and a multi-frame file with per-frame positions get
  their affine from ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM's LPS
  with x and y negated, i.e. RAS) and are reoriented like NIfTI; a multi-frame file without that
  geometry stays (frames, rows, cols) without an affine. RescaleSlope/Intercept are applied (int16
  when the result is integral and fits, else float32); MONOCHROME1 is inverted so that brighter
  always means more signal; colour becomes gray (ITU-R 601-2 luma). Compressed transfer syntaxes
  decode wherever an installed pydicom plugin (pylibjpeg, Pillow) can.
- 2D pictures (PNG, JPEG, BMP, TIFF; Pillow): 8-bit gray stays uint8, 16-bit gray stays uint16,
  colour (RGB, RGBA, palette) becomes 8-bit luma; multi-page files are refused.

Arrays keep the dtype they were stored with (uint8, int16, uint16, float32, ...); only float64,
float16 and int64 are narrowed, RGB NIfTI becomes luma and complex voxels are refused.
``ImageData.patient_id`` carries the DICOM PatientID for grouping only; it is never written
anywhere (ingest hashes it).

Path helpers (``read_image``, ``read_nifti``, ``read_dicom``, ``read_picture``, ``read_mask``) read
the file's bytes and call ``read_bytes`` with the hint its name gives, after checking the file's
size against the limit; ``group_dicom_files`` and ``read_dicom_series`` handle series, which span
several files.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medood.platform.data.privacy import DICOM_META_WHITELIST, dicom_meta

DEFAULT_MAX_VOXELS = 512**3  # a MOOD abdominal volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Formats the sniffer recognises -> a file suffix for each.
FORMAT_SUFFIXES = {
    "dicom": ".dcm",
    "nifti": ".nii",
    "nifti-gz": ".nii.gz",
    "png": ".png",
    "jpeg": ".jpg",
    "bmp": ".bmp",
    "tiff": ".tif",
}
FORMAT_NAMES = {
    "dicom": "a DICOM file",
    "nifti": "a NIfTI file",
    "nifti-gz": "a gzipped NIfTI file",
    "png": "a PNG",
    "jpeg": "a JPEG",
    "bmp": "a BMP",
    "tiff": "a TIFF",
}
#: Hints ``read_bytes`` accepts: a format, or a family from a file name.
HINTS = (*FORMAT_SUFFIXES, "picture")
PICTURE_FORMATS = ("png", "jpeg", "bmp", "tiff")

# DICOM value representations that can carry identity (names, ids, dates, free text, UIDs).
_IDENTITY_VRS = {"PN", "LO", "SH", "DA", "DT", "TM", "UI", "ST", "LT", "UT", "AE", "AS", "UC", "UR"}
# Bytes a file may hold beyond its voxels (headers, DICOM elements, a bad compression ratio).
_FILE_OVERHEAD = 64 * 1024 * 1024


class ImageReadError(ValueError):
    """An image that cannot be read; the message names no header value (see the module docstring)."""


class CorruptImageError(ImageReadError):
    """Truncated or corrupt bytes, or a header value the reader needs that does not parse."""


class HeaderValueError(CorruptImageError):
    """A DICOM header value the reader needs is malformed; names the tag, never the value."""

    def __init__(self, keyword: str, what: str = "malformed") -> None:
        self.keyword = keyword
        super().__init__(f"{what} DICOM header value: {keyword} {_tag_text(keyword)}")


class UnsupportedFormatError(ImageReadError):
    """Not a format any reader handles (or a DICOM transfer syntax without an installed decoder)."""


class ImageTooLargeError(ImageReadError):
    """The header declares more voxels than ``max_voxels``; refused before decoding."""


class NoImageError(ImageReadError):
    """A readable file that holds no image (a DICOM object without pixel data)."""


class DimensionalityError(ImageReadError):
    """An image that is neither 2D nor 3D."""


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


# --- the byte-level API ------------------------------------------------------------------------------


def sniff_format(data: bytes, hint: str | None = None) -> str:
    """The format of ``data`` from its magic bytes: dicom, nifti, nifti-gz, png, jpeg, bmp or tiff.

    ``hint`` ("dicom", "nifti", "picture", a format) only decides bytes without a signature: a
    DICOM hint reads them as a DICOM data set without preamble; any other hint makes them corrupt
    (a file named .png whose bytes are no PNG). Without a hint they are unsupported.
    """
    if hint is not None and hint not in HINTS:
        raise ValueError(f"unknown format hint {hint!r}; known: {', '.join(HINTS)}")
    if not data:
        raise CorruptImageError("empty file")
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"\x1f\x8b":
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = stream.decompress(data, 544)
        except zlib.error as error:
            raise CorruptImageError(f"corrupt gzip stream: {error}") from None
        if _nifti_version(head):
            return "nifti-gz"
        if _truncated_nifti_header(head) or (
            len(head) < 348 and not stream.eof and not stream.unconsumed_tail
        ):
            raise CorruptImageError("truncated gzip stream: it ends before a NIfTI header could be read")
        raise UnsupportedFormatError("the bytes are gzip-compressed but not a gzipped NIfTI (.nii.gz)")
    if _nifti_version(data[:544]):
        return "nifti"
    if _truncated_nifti_header(data[:544]):
        raise CorruptImageError("truncated NIfTI: the bytes end inside the header")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if hint == "dicom":
        return "dicom"
    if hint is not None:
        name = "a picture" if hint == "picture" else FORMAT_NAMES[hint]
        raise CorruptImageError(f"not {name}: the bytes do not start with its signature")
    raise UnsupportedFormatError(
        "unrecognised file type: not DICOM (no 'DICM' at byte 128), NIfTI (.nii, .nii.gz), PNG, JPEG, BMP or TIFF"
    )


def read_bytes(data: bytes, format: str | None = None, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """Decode one file's bytes: header checks (size, dimensionality, codec) first, then pixels.

    Returns a 2D image or a 3D volume; raises an ``ImageReadError`` subclass for anything else.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    fmt = sniff_format(data, format)
    max_voxels = _check_limit(max_voxels)
    try:
        if fmt == "dicom":
            with _quiet_pydicom():
                image = _read_dicom_bytes(data, max_voxels)
        elif fmt in ("nifti", "nifti-gz"):
            image = _read_nifti_bytes(data, fmt, max_voxels)
        else:
            image = _read_picture_bytes(data, fmt, max_voxels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageTooLargeError("the image is too large to decode") from None
    except Exception as error:  # any decoder failure on bad bytes: one safe reason
        raise CorruptImageError(
            f"could not read {FORMAT_NAMES[fmt]} (truncated or corrupt?): {describe_error(error)}"
        ) from None
    if image.array.ndim not in (2, 3):
        raise DimensionalityError(
            f"wrong dimensionality: {FORMAT_NAMES[fmt]} of shape {tuple(image.array.shape)}; "
            "2D images and 3D volumes are supported"
        )
    if image.array.size == 0:
        raise CorruptImageError(
            f"{FORMAT_NAMES[fmt]} holds an empty image (shape {tuple(image.array.shape)})"
        )
    return image


# --- path helpers ------------------------------------------------------------------------------------


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


def read_image(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """Read any supported single file; its name gives the format hint (the bytes decide)."""
    path = Path(path)
    kind = image_format(path)
    if kind is None:
        suffix = "".join(path.suffixes[-2:]) or "(no extension)"
        raise UnsupportedFormatError(
            f"unsupported file type {suffix!r}; supported: .nii, .nii.gz, DICOM, .png, .jpg, .jpeg, .bmp, .tif"
        )
    return read_bytes(_read_file(path, max_voxels), kind, max_voxels=max_voxels)


def read_mask(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """A mask file as uint8 {0, 1} (any non-zero label counts as abnormal)."""
    return (read_image(path, max_voxels=max_voxels).array != 0).astype(np.uint8)


def read_nifti(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """A NIfTI volume reoriented to closest canonical RAS+, in its stored dtype."""
    return _read_as(path, "nifti", ("nifti", "nifti-gz"), max_voxels)


def read_dicom(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """One DICOM file: (rows, cols) for a single frame; a canonical volume for multi-frame."""
    return _read_as(path, "dicom", ("dicom",), max_voxels)


def read_picture(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """A PNG/JPEG/BMP/TIFF as a 2D gray array (uint8, uint16, int32 or float32)."""
    return _read_as(path, "picture", PICTURE_FORMATS, max_voxels)


def _read_as(path: str | Path, hint: str, formats: tuple[str, ...], max_voxels: int) -> ImageData:
    data = _read_file(Path(path), max_voxels)
    fmt = sniff_format(data, hint)
    if fmt not in formats:
        raise UnsupportedFormatError(f"expected {hint} but the bytes are {FORMAT_NAMES[fmt]}")
    return read_bytes(data, fmt, max_voxels=max_voxels)


def _read_file(path: Path, max_voxels: int) -> bytes:
    """The file's bytes, refused unread when it is larger than any image within the limit can be."""
    size = path.stat().st_size
    limit = max_file_bytes(max_voxels)
    if size > limit:
        raise ImageTooLargeError(
            f"the file holds {size} bytes, more than an image of {max_voxels} voxels can (max_voxels)"
        )
    return path.read_bytes()


def max_file_bytes(max_voxels: int) -> int:
    """The largest file accepted for a voxel limit: 4 samples of 8 bytes per voxel plus headers."""
    return int(max_voxels) * 32 + _FILE_OVERHEAD


# --- NIfTI -------------------------------------------------------------------------------------------


def _nifti_version(head: bytes) -> int:
    """1 or 2 when ``head`` starts a single-file NIfTI-1 / NIfTI-2 header, else 0."""
    if len(head) >= 348:
        for endian in "<>":
            if struct.unpack(f"{endian}i", head[:4])[0] == 348 and head[344:348] == b"n+1\x00":
                return 1
    if len(head) >= 540:
        for endian in "<>":
            if struct.unpack(f"{endian}i", head[:4])[0] == 540 and head[4:8] == b"n+2\x00":
                return 2
    return 0


def _truncated_nifti_header(head: bytes) -> bool:
    """True when ``head`` starts like a NIfTI header (its sizeof_hdr) but ends before the magic."""
    if len(head) < 4:
        return False
    sizes = {struct.unpack(f"{endian}i", head[:4])[0] for endian in "<>"}
    return (348 in sizes and len(head) < 348) or (540 in sizes and len(head) < 540)


def _read_nifti_bytes(data: bytes, fmt: str, max_voxels: int) -> ImageData:
    """Header checks from the first 544 bytes, then a bounded decompression and nibabel."""
    import nibabel as nib

    head = data[:544] if fmt == "nifti" else zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 544)
    version = _nifti_version(head)
    endian = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
    if version == 1:
        dims = struct.unpack(f"{endian}8h", head[40:56])
    else:
        dims = struct.unpack(f"{endian}8q", head[16:80])
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise CorruptImageError(f"invalid NIfTI header: dim[0] = {ndim} (must be 1 to 7)")
    shape = tuple(int(d) for d in dims[1 : ndim + 1])
    if any(d < 1 for d in shape):
        raise CorruptImageError(f"invalid NIfTI header: dimensions {shape}")
    if ndim not in (2, 3):
        raise DimensionalityError(
            f"wrong dimensionality: the NIfTI has shape {shape}; 2D images and 3D volumes are supported"
        )
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > max_voxels:
        raise ImageTooLargeError(
            f"the NIfTI declares {voxels} voxels {shape}, over the limit of {max_voxels} (max_voxels)"
        )
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        header = header_class.from_fileobj(io.BytesIO(head), check=False)
        offset = int(header.get_data_offset())
    except Exception as error:
        raise CorruptImageError(f"invalid NIfTI header: {describe_error(error)}") from None
    try:
        dtype = header.get_data_dtype()
    except Exception:
        code = int(header["datatype"])
        raise UnsupportedFormatError(f"unsupported NIfTI datatype code {code}") from None
    needed = max(offset, 348 if version == 1 else 540) + voxels * dtype.itemsize
    raw = data if fmt == "nifti" else _gunzip(data, needed)
    if len(raw) < needed:
        raise CorruptImageError(
            f"truncated NIfTI: {len(raw)} bytes{' once decompressed' if fmt == 'nifti-gz' else ''}, "
            f"the header declares {needed}"
        )
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = image_class.from_bytes(raw[:needed])
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise CorruptImageError("invalid NIfTI header: the affine (qform/sform) holds non-finite values")
    if image.ndim == 3:
        image = nib.as_closest_canonical(image)
    array = _narrow_dtype(np.asanyarray(image.dataobj))
    zooms = image.header.get_zooms()[: array.ndim]
    return ImageData(
        array=array,
        spacing=tuple(float(z) for z in zooms),
        affine=np.asarray(image.affine, dtype=np.float64),
        meta={"format": "nifti"},
    )


def _gunzip(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of a (possibly multi-member) gzip stream: a bomb is never inflated."""
    out = bytearray()
    rest = data
    while rest and len(out) < limit:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += stream.decompress(rest, limit - len(out))
        except zlib.error as error:
            raise CorruptImageError(f"corrupt gzip stream: {error}") from None
        if not stream.eof:
            break  # truncated, or the limit was reached
        rest = stream.unused_data
        if rest[:2] != b"\x1f\x8b":
            break  # trailing garbage after the last member
    return bytes(out)


# --- DICOM -------------------------------------------------------------------------------------------


class _QuietPydicom(logging.Filter):
    """Drops pydicom's log records while medood reads in this thread (they may quote header values)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_state, "quiet", 0)


_state = threading.local()
_QUIET = _QuietPydicom()


def _filter_pydicom_loggers() -> None:
    """A logger's filters see only its own records, so every ``pydicom.*`` logger gets the filter."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "pydicom" or n.startswith("pydicom.")]
    for name in ["pydicom", *names]:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


_validation_lock = threading.Lock()
_validation_users = 0
_validation_saved: Any = None


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """No pydicom warnings, log records or value validation (its messages quote header values).

    pydicom's validation mode is process-wide: the first reader in switches it off, the last one
    out restores it, so concurrent reads (serving's threads) never leave it changed.
    """
    global _validation_users, _validation_saved
    from pydicom import config

    _filter_pydicom_loggers()
    _state.quiet = getattr(_state, "quiet", 0) + 1
    with _validation_lock:
        if _validation_users == 0:
            _validation_saved = config.settings._reading_validation_mode
            config.settings.reading_validation_mode = config.IGNORE
        _validation_users += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _validation_lock:
            _validation_users -= 1
            if _validation_users == 0:
                config.settings._reading_validation_mode = _validation_saved
        _state.quiet -= 1


def _dcmread(source: Any, *, stop_before_pixels: bool = False) -> Any:
    import pydicom

    try:
        with _quiet_pydicom():
            return pydicom.dcmread(source, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # pydicom's messages may quote raw bytes: name the failure only
        raise CorruptImageError(
            f"not a readable DICOM file ({type(error).__name__} while reading the header)"
        ) from None


def read_dicom_header(path: str | Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Any:
    """The header of a DICOM image file without its pixel data; raises if it is not a DICOM image."""
    path = Path(path)
    if path.stat().st_size > max_file_bytes(max_voxels):
        raise ImageTooLargeError("the file is larger than any image within max_voxels")
    dataset = _dcmread(str(path), stop_before_pixels=True)
    if _int_tag(dataset, "Rows") is None or _int_tag(dataset, "Columns") is None:
        raise NoImageError("the DICOM file holds no image (no Rows/Columns)")
    return dataset


def group_dicom_files(
    paths: Sequence[Path], *, max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[list[DicomUnit], list[tuple[Path, str]]]:
    """Group DICOM files into rows: slices of one series in one folder become one volume.

    A file joins a series when it is single-frame and has SeriesInstanceUID, ImagePositionPatient
    and ImageOrientationPatient; other files (radiographs, multi-frame) are rows of their own.
    Returns the units and the files whose header could not be read, with the reason (never a
    header value). No file's header can stop the others.
    """
    failures: list[tuple[Path, str]] = []
    series: dict[tuple[str, str, tuple[float, ...]], list[tuple[Path, str | None]]] = defaultdict(list)
    singles: list[DicomUnit] = []
    for path in sorted(paths):
        try:
            with _quiet_pydicom():
                header = read_dicom_header(path, max_voxels=max_voxels)
            with _quiet_pydicom():
                patient_id = _str_tag(header, "PatientID") or None
                frames = _int_tag(header, "NumberOfFrames", 1)
                uid = _str_tag(header, "SeriesInstanceUID")
                orientation = _floats_tag(header, "ImageOrientationPatient", 6)
                position = _floats_tag(header, "ImagePositionPatient", 3)
        except ImageReadError as error:
            failures.append((path, describe_error(error)))
            continue
        except Exception as error:  # a bug, not a file's fault; still only this file is quarantined
            failures.append((path, f"could not read the DICOM header ({type(error).__name__})"))
            continue
        if frames == 1 and uid and orientation is not None and position is not None:
            # slices of one series share one orientation; another orientation is another stack
            key = (str(path.parent), uid, tuple(np.round(orientation, 4)))
            series[key].append((path, patient_id))
        else:
            singles.append(DicomUnit([path], patient_id, is_series=False))
    units = list(singles)
    for members in series.values():
        files = [p for p, _ in members]
        units.append(DicomUnit(files, members[0][1], is_series=len(files) > 1))
    units.sort(key=lambda unit: unit.files[0])
    return units, failures


@dataclass
class _DicomFile:
    """A parsed DICOM data set with the header values the reader needs, checked."""

    dataset: Any
    rows: int
    columns: int
    frames: int
    samples: int
    secrets: list[str]


def _parse_dicom(data: bytes, max_voxels: int) -> _DicomFile:
    """Parse and check a DICOM file's header: image present, size within the limit, codec installed."""
    dataset = _dcmread(io.BytesIO(data))
    with _quiet_pydicom():
        secrets = _identity_values(dataset)
    try:
        with _quiet_pydicom():
            rows, columns = _int_tag(dataset, "Rows"), _int_tag(dataset, "Columns")
            has_pixels = any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
            if not has_pixels:
                raise NoImageError("the DICOM file holds no pixel data")
            if not rows or not columns:
                raise NoImageError("the DICOM file holds no image (no Rows/Columns)")
            frames = _int_tag(dataset, "NumberOfFrames", 1)
            samples = _int_tag(dataset, "SamplesPerPixel", 1)
            for keyword in ("BitsAllocated", "BitsStored", "PixelRepresentation", "PlanarConfiguration"):
                _int_tag(dataset, keyword)
            if frames < 1:
                raise HeaderValueError("NumberOfFrames", "invalid")
            if samples not in (1, 3, 4):
                raise HeaderValueError("SamplesPerPixel", "unsupported")
            pixels = rows * columns * frames * samples
            if pixels > max_voxels:
                raise ImageTooLargeError(
                    f"the DICOM declares {rows}x{columns}x{frames} pixels, over the limit of {max_voxels} (max_voxels)"
                )
            _check_decoder(dataset)
    except ImageReadError:
        raise  # medood's own messages: they name tags and sizes, never values
    except Exception as error:
        raise CorruptImageError(_scrub(f"invalid DICOM header: {describe_error(error)}", secrets)) from None
    return _DicomFile(dataset, rows, columns, frames, samples, secrets)


def _check_decoder(dataset: Any) -> None:
    from pydicom.pixels import get_decoder

    file_meta = getattr(dataset, "file_meta", None)
    syntax = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    if syntax is None or "PixelData" not in dataset:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        name = getattr(syntax, "name", "") or str(syntax)
        shown = name if name == str(syntax) else f"{name} ({syntax})"
        # a UID is not identity, but a mutated one could be any text: keep it short and printable
        shown = re.sub(r"[^\w .()/-]", "?", shown)[:120]
        raise UnsupportedFormatError(
            f"unsupported DICOM transfer syntax {shown}: no pixel data decoder is installed for it"
        )


def _read_dicom_bytes(data: bytes, max_voxels: int) -> ImageData:
    parsed = _parse_dicom(data, max_voxels)
    dataset, frames = parsed.dataset, parsed.frames
    array = _dicom_pixels(parsed)
    meta = _meta(parsed)
    with _quiet_pydicom():
        row_spacing, col_spacing = _pixel_spacing(dataset)
        if frames > 1 and array.ndim == 3:
            slice_spacing, affine = _multiframe_geometry(dataset, frames, row_spacing, col_spacing)
            if affine is not None:
                array, affine = _canonical(array, affine)
                spacing: tuple[float, ...] | None = _affine_spacing(affine)
            else:
                spacing = None if row_spacing is None else (slice_spacing or 1.0, row_spacing, col_spacing)
        else:
            affine = None
            spacing = None if row_spacing is None else (row_spacing, col_spacing)
        patient_id = _str_tag(dataset, "PatientID") or None
    return ImageData(array=array, spacing=spacing, affine=affine, meta=meta, patient_id=patient_id)


def read_dicom_series(paths: Sequence[str | Path], *, max_voxels: int = DEFAULT_MAX_VOXELS) -> ImageData:
    """Single-frame slices of one series as one canonical (RAS) volume, sorted along the normal."""
    if len(paths) == 1:
        return read_dicom(paths[0], max_voxels=max_voxels)
    max_voxels = _check_limit(max_voxels)
    try:
        with _quiet_pydicom():
            return _read_series(paths, max_voxels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageTooLargeError("the series is too large to decode") from None
    except Exception as error:  # a bug or an unforeseen header: one safe reason, no header value
        raise CorruptImageError(f"could not read the DICOM series ({type(error).__name__})") from None


def _read_series(paths: Sequence[str | Path], max_voxels: int) -> ImageData:
    parsed = [_parse_dicom(_read_file(Path(p), max_voxels), max_voxels) for p in paths]
    first = parsed[0]
    shape = (first.rows, first.columns)
    if first.rows * first.columns * len(parsed) > max_voxels:
        raise ImageTooLargeError(
            f"the series declares {len(parsed)} slices of {first.rows}x{first.columns} pixels, "
            f"over the limit of {max_voxels} (max_voxels)"
        )
    with _quiet_pydicom():
        orientation = _floats_tag(first.dataset, "ImageOrientationPatient", 6, required=True)
        positions = []
        for path, item in zip(paths, parsed, strict=True):
            if (item.rows, item.columns) != shape or item.frames != 1:
                raise CorruptImageError(
                    f"inconsistent series: {Path(path).name} is not a {shape[0]}x{shape[1]} single frame"
                )
            other = _floats_tag(item.dataset, "ImageOrientationPatient", 6, required=True)
            if not np.allclose(other, orientation, atol=1e-4):
                raise CorruptImageError(
                    f"inconsistent series: {Path(path).name} has another ImageOrientationPatient"
                )
            positions.append(_floats_tag(item.dataset, "ImagePositionPatient", 3, required=True))
        row_spacing, col_spacing = _pixel_spacing(first.dataset)
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, col_cosine)
    if np.linalg.norm(normal) < 1e-3:
        raise HeaderValueError("ImageOrientationPatient", "degenerate")
    points = np.asarray(positions)
    distances = points @ normal
    order = np.argsort(distances, kind="stable")
    gaps = np.diff(distances[order])
    if np.any(gaps < 1e-4):
        raise CorruptImageError("inconsistent series: two slices share one ImagePositionPatient")
    planes = [_dicom_pixels(parsed[i]) for i in order]
    if any(plane.shape != shape for plane in planes):
        raise CorruptImageError("inconsistent series: a slice's pixel data is not one gray frame")
    dtypes = {plane.dtype for plane in planes}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    volume = np.stack([plane.astype(dtype, copy=False) for plane in planes])
    slice_spacing = float(np.median(gaps))
    row_spacing = row_spacing or 1.0
    col_spacing = col_spacing or 1.0
    step = (points[order[-1]] - points[order[0]]) / (len(order) - 1)
    affine = _lps_to_ras(step, col_cosine * row_spacing, row_cosine * col_spacing, points[order[0]])
    volume, affine = _canonical(volume, affine)
    meta = _meta(first)
    meta["n_files"] = len(paths)
    if np.ptp(gaps) > 0.01 * slice_spacing:
        meta["irregular_slice_spacing"] = True
    with _quiet_pydicom():
        patient_id = _str_tag(first.dataset, "PatientID") or None
    return ImageData(
        array=volume,
        spacing=_affine_spacing(affine),
        affine=affine,
        meta=meta,
        patient_id=patient_id,
        n_files=len(paths),
    )


def _meta(parsed: _DicomFile) -> dict[str, Any]:
    with _quiet_pydicom():
        meta = dicom_meta(parsed.dataset)
        if _str_tag(parsed.dataset, "PhotometricInterpretation") == "MONOCHROME1":
            meta["inverted_monochrome1"] = True
    return meta


def _dicom_pixels(parsed: _DicomFile) -> np.ndarray:
    """Decoded pixels with the modality LUT (rescale) applied, MONOCHROME1 inverted, colour to gray."""
    dataset = parsed.dataset
    try:
        with _quiet_pydicom():
            raw = np.asarray(dataset.pixel_array)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageTooLargeError("the DICOM pixel data is too large to decode") from None
    except Exception as error:
        raise CorruptImageError(
            _scrub(f"cannot decode the DICOM pixel data: {describe_error(error)}", parsed.secrets)
        ) from None
    expected = parsed.rows * parsed.columns * parsed.frames * parsed.samples
    if raw.size != expected:
        raise CorruptImageError(
            "the decoded DICOM pixel data does not match Rows, Columns and NumberOfFrames"
        )
    if parsed.samples > 1 and raw.shape[-1] == parsed.samples:
        # pydicom returns RGB (YBR is converted by default); ITU-R 601-2 luma, as Pillow's "L".
        raw = np.round(raw[..., 0] * 0.299 + raw[..., 1] * 0.587 + raw[..., 2] * 0.114).astype(raw.dtype)
    with _quiet_pydicom():
        photometric = _str_tag(dataset, "PhotometricInterpretation")
        slope = _float_tag(dataset, "RescaleSlope", 1.0)
        intercept = _float_tag(dataset, "RescaleIntercept", 0.0)
    if photometric == "MONOCHROME1" and raw.size:
        raw = (raw.max() + raw.min() - raw.astype(np.float64 if raw.dtype.kind == "f" else np.int64)).astype(
            raw.dtype
        )
    if slope == 1.0 and intercept == 0.0:
        return _narrow_dtype(np.asarray(raw))
    if float(slope).is_integer() and float(intercept).is_integer() and raw.dtype.kind in "iu":
        values = raw.astype(np.int64) * int(slope) + int(intercept)
        info = np.iinfo(np.int16)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(np.int16)
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


def _pixel_spacing(dataset: Any) -> tuple[float | None, float | None]:
    spacing = _floats_tag(dataset, "PixelSpacing", 2)
    if spacing is None:
        spacing = _floats_tag(dataset, "ImagerPixelSpacing", 2)
    if spacing is None:
        shared = _functional_group(dataset, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
        spacing = None if shared is None else _floats_tag(shared, "PixelSpacing", 2)
    if spacing is None:
        return None, None
    if np.any(spacing <= 0):
        raise HeaderValueError("PixelSpacing", "invalid")
    return float(spacing[0]), float(spacing[1])


def _functional_group(dataset: Any, sequence: str, item: str, index: int = 0) -> Any:
    try:
        groups = dataset.get(sequence)
        if not groups or len(groups) <= index:
            return None
        inner = groups[index].get(item)
        return inner[0] if inner else None
    except Exception:
        raise HeaderValueError(sequence) from None


def _multiframe_geometry(
    dataset: Any, frames: int, row_spacing: float | None, col_spacing: float | None
) -> tuple[float | None, np.ndarray | None]:
    """Slice spacing and affine of a multi-frame file when its frames form an even stack."""
    orientation = _floats_tag(dataset, "ImageOrientationPatient", 6)
    if orientation is None:
        plane = _functional_group(dataset, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence")
        orientation = None if plane is None else _floats_tag(plane, "ImageOrientationPatient", 6)
    positions = []
    for index in range(frames):
        plane = _functional_group(dataset, "PerFrameFunctionalGroupsSequence", "PlanePositionSequence", index)
        position = None if plane is None else _floats_tag(plane, "ImagePositionPatient", 3)
        if position is None:
            break
        positions.append(position)
    fallback_spacing = _float_tag(dataset, "SpacingBetweenSlices", None) or _float_tag(
        dataset, "SliceThickness", None
    )
    if orientation is None or len(positions) != frames or row_spacing is None:
        return fallback_spacing, None
    normal = np.cross(orientation[:3], orientation[3:])
    points = np.asarray(positions)
    gaps = np.diff(points @ normal)
    if (
        frames < 2
        or np.linalg.norm(normal) < 1e-3
        or np.any(gaps <= 1e-4)
        or np.ptp(gaps) > 0.01 * float(np.median(gaps))
    ):
        return fallback_spacing, None
    step = (points[-1] - points[0]) / (frames - 1)
    affine = _lps_to_ras(step, orientation[3:] * row_spacing, orientation[:3] * col_spacing, points[0])
    return float(np.median(gaps)), affine


def _lps_to_ras(axis0: np.ndarray, axis1: np.ndarray, axis2: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 affine from index (i, j, k) to RAS mm, given DICOM (LPS) steps per index and origin."""
    affine = np.eye(4)
    affine[:3, 0] = axis0
    affine[:3, 1] = axis1
    affine[:3, 2] = axis2
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A volume and its affine reoriented to the closest canonical RAS+ (as ``as_closest_canonical``)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    reoriented = np.ascontiguousarray(apply_orientation(array, ornt))
    return reoriented, affine @ inv_ornt_aff(ornt, array.shape)


def _affine_spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


# --- DICOM header values, read leniently -------------------------------------------------------------


def _tag_text(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return "" if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _value(dataset: Any, keyword: str) -> Any:
    try:
        return dataset.get(keyword)
    except Exception:  # pydicom converts raw values on access; a malformed one raises
        raise HeaderValueError(keyword) from None


def _first_number(dataset: Any, keyword: str) -> float | None:
    """A numeric tag's (first) value as a float; ``None`` when absent or empty; ``HeaderValueError`` when malformed."""
    value = _value(dataset, keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except Exception:
        raise HeaderValueError(keyword) from None


def _int_tag(dataset: Any, keyword: str, default: int | None = None) -> int | None:
    number = _first_number(dataset, keyword)
    if number is None:
        return default
    if not np.isfinite(number) or number != int(number):
        raise HeaderValueError(keyword)
    return int(number)


def _float_tag(dataset: Any, keyword: str, default: float | None) -> float | None:
    number = _first_number(dataset, keyword)
    if number is None:
        return default
    if not np.isfinite(number):
        raise HeaderValueError(keyword)
    return number


def _floats_tag(dataset: Any, keyword: str, n: int, *, required: bool = False) -> np.ndarray | None:
    value = _value(dataset, keyword)
    if value is None or value == "":
        if required:
            raise HeaderValueError(keyword, "missing")
        return None
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:
        raise HeaderValueError(keyword) from None
    if values.shape != (n,) or not np.isfinite(values).all():
        raise HeaderValueError(keyword)
    return values


def _str_tag(dataset: Any, keyword: str) -> str:
    value = _value(dataset, keyword)
    return "" if value is None else str(value).strip()


def _identity_values(dataset: Any, depth: int = 0) -> list[str]:
    """Every text value of a DICOM header that could identify someone (longest first).

    Reads raw values where it can, so a malformed element is still collected; never raises.
    """
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    values: set[str] = set()
    if depth > 8:
        return []
    try:
        tags = list(dataset.keys())
    except Exception:
        return []
    for tag in tags:
        try:
            element = dataset.get_item(tag)
            keyword = keyword_for_tag(tag) or ""
            if keyword in DICOM_META_WHITELIST:
                continue
            vr = getattr(element, "VR", None)
            if vr is None:
                try:
                    vr = dataset[tag].VR
                except Exception:
                    vr = dictionary_VR(tag) if keyword else "UN"
            if vr == "SQ":
                for item in dataset[tag].value:
                    values.update(_identity_values(item, depth + 1))
                continue
            if vr not in _IDENTITY_VRS and vr != "UN":
                continue
            value = element.value
        except Exception:
            continue
        texts: list[str] = []
        if isinstance(value, (bytes, bytearray)):
            if len(value) <= 1024:
                texts.append(bytes(value).decode("latin-1"))
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            texts.extend(str(v) for v in value)
        elif value is not None:
            texts.append(str(value))
        for text in texts:
            text = text.strip(" \x00")
            if len(text) >= 3:
                values.add(text)
                values.update(p for p in re.split(r"[\\^=\s\x00]+", text) if len(p) >= 3)
    return sorted(values, key=len, reverse=True)


def _scrub(message: str, secrets: Sequence[str]) -> str:
    for value in secrets:
        message = message.replace(value, "[redacted]")
    return message[:500]


# --- 2D pictures -------------------------------------------------------------------------------------


def _read_picture_bytes(data: bytes, fmt: str, max_voxels: int) -> ImageData:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            picture = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"the picture is too large to decode (over the limit of {max_voxels} pixels)"
        ) from None
    except Exception as error:
        raise CorruptImageError(f"corrupt {fmt.upper()}: {_pillow_reason(error)}") from None
    with picture, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        width, height = picture.size
        if width * height > max_voxels:
            raise ImageTooLargeError(
                f"the picture has {width}x{height} pixels, over the limit of {max_voxels} (max_voxels)"
            )
        if getattr(picture, "n_frames", 1) > 1:
            raise UnsupportedFormatError(f"multi-frame {picture.format} images are not supported")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                picture.load()
                mode = picture.mode
                if mode in ("L", "I", "F") or mode.startswith("I;16"):
                    array = np.asarray(picture)
                elif mode == "LA":
                    array = np.asarray(picture.getchannel("L"))
                else:  # 1, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV: luma (ITU-R 601-2) as 8-bit gray
                    array = np.asarray(picture.convert("L"))
        except Exception as error:
            raise CorruptImageError(f"corrupt {fmt.upper()}: {_pillow_reason(error)}") from None
    array = np.array(array, dtype=array.dtype.newbyteorder("="), copy=True)
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    return ImageData(array=_narrow_dtype(array), meta={"format": fmt})


def _pillow_reason(error: BaseException) -> str:
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the bytes", describe_error(error))[:200]


# --- helpers -----------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """A one-line reason for the quarantine list: the exception type and its message."""
    message = " ".join(str(error).split())
    if len(message) > 500:
        message = message[:497] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _check_limit(max_voxels: int) -> int:
    if isinstance(max_voxels, bool) or int(max_voxels) < 1:
        raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
    return int(max_voxels)


def _narrow_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype.names is not None:
        names = tuple(n.upper() for n in array.dtype.names)
        if names[:3] == ("R", "G", "B"):  # NIfTI RGB24 / RGBA32: luma (ITU-R 601-2), as pictures
            fields = [array[name].astype(np.float64) for name in array.dtype.names[:3]]
            return np.round(fields[0] * 0.299 + fields[1] * 0.587 + fields[2] * 0.114).astype(np.uint8)
        raise UnsupportedFormatError(f"unsupported voxel type with fields {array.dtype.names}")
    if array.dtype.kind == "c":
        raise UnsupportedFormatError("complex voxel values are not supported")
    if array.dtype.kind not in "biuf":
        raise UnsupportedFormatError(f"unsupported voxel type {array.dtype.name}")
    if array.dtype == np.float64 or array.dtype == np.float16 or array.dtype.itemsize > 8:
        return array.astype(np.float32)
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.int64 or array.dtype == np.uint64:
        if array.size and array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
        return array.astype(np.float32)
    return array
