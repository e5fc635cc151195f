"""Readers: NIfTI to canonical RAS, DICOM files/series/multi-frame/compressed, 2D pictures."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from medood.platform.data.privacy import DICOM_META_WHITELIST
from medood.platform.data.readers import (
    CorruptImageError,
    DimensionalityError,
    HeaderValueError,
    ImageReadError,
    ImageTooLargeError,
    NoImageError,
    UnsupportedFormatError,
    group_dicom_files,
    image_format,
    max_file_bytes,
    read_bytes,
    read_dicom,
    read_dicom_series,
    read_image,
    read_mask,
    read_nifti,
    read_picture,
    sniff_format,
)


def _dicom(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


# --- NIfTI -------------------------------------------------------------------------------------------


def test_nifti_is_reoriented_to_canonical_ras_keeping_dtype(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([-2.0, 1.5, 3.0, 1.0])  # LAS: x flipped
    affine[:3, 3] = [10.0, -5.0, 2.0]
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    image = read_nifti(path)

    assert image.array.dtype == np.int16
    assert image.array.shape == (4, 5, 6)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(image.array, data[::-1])
    assert image.spacing == pytest.approx((2.0, 1.5, 3.0))
    # the same voxel maps to the same world point before and after reorientation
    world_before = affine @ np.array([0, 1, 2, 1.0])
    world_after = image.affine @ np.array([3, 1, 2, 1.0])
    np.testing.assert_allclose(world_before, world_after)


def test_nifti_uncompressed_float_and_uint8(tmp_path: Path) -> None:
    for dtype in (np.float32, np.uint8):
        data = (np.random.default_rng(0).random((3, 4, 2)) * 100).astype(dtype)
        path = tmp_path / f"{np.dtype(dtype).name}.nii"
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        image = read_image(path)
        assert image.array.dtype == dtype
        np.testing.assert_array_equal(image.array, data)


def test_nifti_mask_is_binary(tmp_path: Path) -> None:
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 2, 4
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    mask = read_mask(tmp_path / "seg.nii.gz")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.sum() == 2


def test_truncated_nifti_raises(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    for name in ("vol.nii.gz", "vol.nii"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CorruptImageError, match="truncated NIfTI"):
            read_nifti(path)


# --- DICOM -------------------------------------------------------------------------------------------


def test_ct_rescale_gives_int16_hounsfield_and_whitelisted_meta() -> None:
    path = get_testdata_file("CT_small.dcm")
    raw = _dicom("CT_small.dcm").pixel_array.astype(np.int32)

    image = read_dicom(path)

    assert image.array.dtype == np.int16
    np.testing.assert_array_equal(image.array, raw - 1024)
    assert image.spacing == pytest.approx(tuple(float(v) for v in _dicom("CT_small.dcm").PixelSpacing))
    assert set(image.meta) <= set(DICOM_META_WHITELIST)
    assert image.meta["Modality"] == "CT" and image.meta["RescaleIntercept"] == -1024
    assert image.patient_id == "1CT1"  # for grouping only; never written


def test_fractional_rescale_gives_float32(tmp_path: Path) -> None:
    ds = _dicom("MR_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, 1.25
    ds.save_as(tmp_path / "mr.dcm")
    image = read_image(tmp_path / "mr.dcm")
    assert image.array.dtype == np.float32
    np.testing.assert_allclose(image.array, ds.pixel_array * 0.5 + 1.25)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = _dicom("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    image = read_dicom(tmp_path / "m1.dcm")
    raw = ds.pixel_array
    np.testing.assert_array_equal(image.array, raw.max() + raw.min() - raw)
    assert image.meta["inverted_monochrome1"] is True


def _write_series(folder: Path, positions: list[float], uid: str | None = None) -> list[Path]:
    """Slices of MR_small at z positions (file order deliberately not slice order); pixel = index."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _dicom("MR_small.dcm")
    uid = uid or generate_uid()
    paths = []
    for index, z in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, z]
        ds.PixelData = np.full((64, 64), index, dtype=np.int16).tobytes()
        path = folder / f"slice{index}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_series_is_sorted_along_the_normal_with_ras_affine(tmp_path: Path) -> None:
    paths = _write_series(tmp_path / "series", [6.0, 0.0, 9.0, 3.0])
    units, failures = group_dicom_files(paths)
    assert failures == [] and len(units) == 1 and units[0].is_series and len(units[0].files) == 4

    volume = read_dicom_series(units[0].files)

    # canonical RAS like NIfTI: (X, Y, Z) = (cols reversed, rows reversed, slices by z)
    assert volume.array.shape == (64, 64, 4) and volume.array.dtype == np.int16
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert [int(volume.array[0, 0, k]) for k in range(4)] == [1, 3, 0, 2]  # z = 0, 3, 6, 9
    ps = [float(v) for v in _dicom("MR_small.dcm").PixelSpacing]
    assert volume.spacing == pytest.approx((ps[1], ps[0], 3.0))
    assert volume.meta["n_files"] == 4 and volume.n_files == 4
    # the DICOM pixel (row 0, col 1) of the slice at z=6 sits at LPS (-10 + ps[1], -20, 6), i.e.
    # RAS (10 - ps[1], 20, 6); canonical X runs against DICOM columns, Y against rows
    index = np.linalg.solve(volume.affine, [10.0 - ps[1], 20.0, 6.0, 1.0])
    np.testing.assert_allclose(index, [62, 63, 2, 1], atol=1e-6)


def test_series_with_duplicate_positions_raises(tmp_path: Path) -> None:
    paths = _write_series(tmp_path / "dup", [0.0, 0.0, 3.0])
    with pytest.raises(ValueError, match="share one ImagePositionPatient"):
        read_dicom_series(paths)


def test_two_series_in_one_folder_and_radiographs_stay_apart(tmp_path: Path) -> None:
    first = _write_series(tmp_path / "f", [0.0, 1.0])
    second = [p.rename(p.with_name(f"b{p.name}")) for p in _write_series(tmp_path / "g", [0.0, 1.0, 2.0])]
    moved = [shutil.move(p, tmp_path / "f" / p.name) for p in second]
    radiograph = tmp_path / "f" / "cr.dcm"
    ds = _dicom("MR_small.dcm")
    del ds.ImagePositionPatient
    ds.save_as(radiograph)
    units, _ = group_dicom_files([*first, *map(Path, moved), radiograph])
    sizes = sorted((len(u.files), u.is_series) for u in units)
    assert sizes == [(1, False), (2, True), (3, True)]


def test_multiframe_keeps_frames() -> None:
    image = read_dicom(get_testdata_file("rtdose.dcm"))
    assert image.array.shape == (15, 10, 10)


def test_compressed_transfer_syntaxes_decode_with_installed_plugins() -> None:
    lossless = read_dicom(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    np.testing.assert_array_equal(lossless.array, read_dicom(get_testdata_file("MR_small.dcm")).array)
    j2k = read_dicom(get_testdata_file("JPEG2000.dcm"))
    assert j2k.array.ndim == 2 and j2k.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.91"
    rgb = read_dicom(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert rgb.array.shape == (100, 100) and rgb.array.dtype == np.uint8


def test_undecodable_compressed_dicom_raises_with_reason(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="decode|JPEG"):
        read_dicom(get_testdata_file("JPEG-lossy.dcm"))
    ds = _dicom("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder installed
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(Exception, match="1.2.840.10008.1.2.4.100|MPEG"):
        read_dicom(tmp_path / "mpeg.dcm")


def test_truncated_dicom_raises() -> None:
    with pytest.raises(ValueError, match="less than expected"):
        read_dicom(get_testdata_file("MR_truncated.dcm"))


def test_extensionless_dicom_is_detected(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "IM0001")
    (tmp_path / "README").write_text("not an image")
    assert image_format(tmp_path / "IM0001") == "dicom"
    assert image_format(tmp_path / "README") is None
    assert read_image(tmp_path / "IM0001").array.shape == (128, 128)


# --- 2D pictures -------------------------------------------------------------------------------------


def test_pictures_keep_8_and_16_bit_gray_and_convert_colour(tmp_path: Path) -> None:
    gray8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray8, mode="L").save(tmp_path / "g8.png")
    gray16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.jpg", quality=100)
    rgba = np.dstack([rgb, np.full((3, 4), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")

    g8 = read_picture(tmp_path / "g8.png").array
    g16 = read_picture(tmp_path / "g16.png").array
    assert g8.dtype == np.uint8 and np.array_equal(g8, gray8)
    assert g16.dtype == np.uint16 and np.array_equal(g16, gray16) and g16.max() > 255
    for name in ("rgb.jpg", "rgba.png"):
        gray = read_image(tmp_path / name).array
        assert gray.shape == (3, 4) and gray.dtype == np.uint8
        assert abs(int(gray.mean()) - 76) <= 3  # luma of pure red: 0.299 * 255


def test_truncated_picture_and_unknown_format_raise(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="corrupt PNG"):
        read_image(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match=r"'\.txt'"):
        read_image(tmp_path / "notes.txt")


# --- the byte-level API: sniffing, header checks before decoding, safe reasons -----------------------


def test_read_bytes_sniffs_the_format_and_the_hint_only_decides_bytes_without_a_signature(
    tmp_path: Path,
) -> None:
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nifti = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert sniff_format(nifti) == "nifti" and sniff_format(ct) == "dicom"
    # a name that lies does not matter: the bytes decide
    assert read_bytes(nifti, "picture").array.shape == (2, 3, 4)
    # a DICOM data set without the 128-byte preamble has no signature: the hint reads it
    raw = ct[132:]  # the data set without the preamble and the DICM prefix
    with pytest.raises(UnsupportedFormatError, match="unrecognised file type"):
        read_bytes(raw)
    assert read_bytes(raw, "dicom").array.ndim == 2
    with pytest.raises(NoImageError, match="no pixel data"):
        read_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes(), "dicom")
    with pytest.raises(CorruptImageError, match="not a PNG"):
        read_bytes(b"hello world, not a picture", "png")
    with pytest.raises(CorruptImageError, match="empty file"):
        read_bytes(b"", "dicom")
    with pytest.raises(ValueError, match="unknown format hint"):
        read_bytes(nifti, "gif")


def test_declared_sizes_over_the_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    # a gzipped NIfTI declaring 1000^3 voxels: refused without inflating a byte of voxel data
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    bomb = __import__("gzip").compress(header.binaryblock + b"\x00" * 4)
    with pytest.raises(ImageTooLargeError, match=r"declares 1000000000 voxels"):
        read_bytes(bomb, max_voxels=2**20)
    ds = _dicom("MR_small.dcm")
    ds.Rows = ds.Columns = 60000
    with pytest.raises(ImageTooLargeError, match="60000x60000x1 pixels"):
        read_bytes(_dataset_bytes(ds), max_voxels=2**20)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 300), np.uint8)).save(big)
    with pytest.raises(ImageTooLargeError, match="300x200"):
        read_image(big, max_voxels=200 * 300 - 1)
    assert read_image(big, max_voxels=200 * 300).array.shape == (200, 300)
    # a file larger than any image within the limit could be is not even read (a sparse file)
    huge = tmp_path / "huge.dcm"
    with open(huge, "wb") as handle:
        handle.truncate(max_file_bytes(2**20) + 1)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        read_image(huge, max_voxels=2**20)


def test_a_malformed_header_value_names_the_tag_never_the_value() -> None:
    ds = _dicom("MR_small.dcm")
    ds.PatientName = "Doe^Jane"
    ds[0x00280008] = _raw(0x00280008, "IS", b"1A")  # NumberOfFrames: not an integer
    with pytest.raises(HeaderValueError) as caught:
        read_bytes(_dataset_bytes(ds))
    assert str(caught.value) == "malformed DICOM header value: NumberOfFrames (0028,0008)"
    ds = _dicom("MR_small.dcm")
    ds[0x00281053] = _raw(0x00281053, "DS", b"Doe^Jane")  # RescaleSlope holding a name
    with pytest.raises(HeaderValueError, match=r"RescaleSlope \(0028,1053\)") as caught:
        read_bytes(_dataset_bytes(ds))
    assert "Doe" not in str(caught.value) and "Jane" not in str(caught.value)
    # a malformed value the reader does not need is not parsed at all
    ds = _dicom("MR_small.dcm")
    ds[0x00200013] = _raw(0x00200013, "IS", b"7X")  # InstanceNumber
    assert read_bytes(_dataset_bytes(ds)).array.shape == (64, 64)


def _raw(tag: int, vr: str, value: bytes) -> object:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_only_2d_and_3d_images_are_read() -> None:
    for shape in ((4, 4, 4, 2), (100,)):
        data = nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)).to_bytes()
        with pytest.raises(DimensionalityError, match="wrong dimensionality"):
            read_bytes(data)
    flat = read_bytes(nib.Nifti1Image(np.ones((5, 6), np.float32), np.diag([-1.0, 1, 1, 1])).to_bytes())
    assert flat.array.shape == (5, 6)


def test_every_failure_is_an_image_read_error() -> None:
    nifti = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_bytes()
    for body in (nifti[:200], nifti[:-10], b"\x1f\x8b" + b"\x00" * 40, b"II*\x00" + b"\x00" * 10):
        with pytest.raises(ImageReadError):
            read_bytes(body)


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


# --- one orientation whatever the format -------------------------------------------------------------


def _write_as_dicom_series(folder: Path, volume: np.ndarray, affine: np.ndarray) -> list[Path]:
    """``volume`` (i, j, k) with its RAS ``affine`` as single-frame slices along k, in shuffled order.

    DICOM column index = i, row index = j, slice = k; positions and cosines in LPS.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    along_columns, along_rows = lps[:3, 0], lps[:3, 1]
    base = _dicom("MR_small.dcm")
    uid = generate_uid()
    paths = []
    for k in np.random.default_rng(0).permutation(volume.shape[2]):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.ImageOrientationPatient = [
            *(along_columns / np.linalg.norm(along_columns)),
            *(along_rows / np.linalg.norm(along_rows)),
        ]
        ds.PixelSpacing = [float(np.linalg.norm(along_rows)), float(np.linalg.norm(along_columns))]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).astype(np.int16).tobytes()
        path = folder / f"IM{k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_a_volume_as_nifti_and_as_a_dicom_series_reads_to_the_same_array_and_affine(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).integers(-1000, 3000, size=(7, 5, 4)).astype(np.int16)
    # an oblique-free but not RAS acquisition: x flipped, y and z swapped (a coronal stack)
    affine = np.array(
        [[-0.8, 0.0, 0.0, 40.0], [0.0, 0.0, 2.5, -30.0], [0.0, 0.9, 0.0, 12.0], [0.0, 0.0, 0.0, 1.0]]
    )
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
    paths = _write_as_dicom_series(tmp_path / "series", volume, affine)

    from_nifti = read_image(tmp_path / "vol.nii.gz")
    units, failures = group_dicom_files(paths)
    assert failures == [] and len(units) == 1
    from_dicom = read_dicom_series(units[0].files)

    assert nib.aff2axcodes(from_nifti.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    assert from_dicom.spacing == pytest.approx(from_nifti.spacing, abs=1e-4)
