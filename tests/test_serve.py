"""Serving: options and naming (no Ray), then one local Ray and one Serve app for the module.

The app serves two tiny checkpoints built from freshly initialised autoencoders (a 2D and a 3D
one). Served scores must equal ``score_split``'s (what ``medood evaluate`` reports) for a NIfTI
of ``synthetic-brain``, a PNG of ``digitanatomy`` and DICOM files ingested with the ``folder``
layout; hostile payloads must get a 4xx without restarting a replica; the token is enforced.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import secrets
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from medood import methods
from medood.platform import checkpoint as ckpt
from medood.platform import serve as S
from medood.platform.data.stream import InputSpec, collate, prepare_sample, read_manifest, to_torch_batch

TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-0042-XYZ"
MAX_BODY_MB = 1.0
MAX_VOXELS = 2**20
CONFIG_FILE = Path(S.__file__).with_name("serve_config.yaml")


# --- no Ray: options, names, the config file, decoding --------------------------------------------


def test_options_validate_and_name_the_bad_value():
    options = S.ServeOptions.from_args(
        {"checkpoints": "a", "replicas": "auto", "max_replicas": 3, "max_batch_size": 4}
    )
    assert options.checkpoints == ("a",)
    assert options.autoscaling_config() == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4,
    }
    assert S.ServeOptions.from_args({"checkpoints": ["a"], "replicas": 2}).autoscaling_config() is None
    assert (
        S.ServeOptions.from_args(
            {"checkpoints": ["a"], "replicas": 2, "max_replicas": 5}
        ).autoscaling_config()["min_replicas"]
        == 2
    )
    with pytest.raises(ValueError, match="unknown serve option.*'replica'"):
        S.ServeOptions.from_args({"checkpoints": ["a"], "replica": 2})
    with pytest.raises(ValueError, match="replicas must be a positive integer or 'auto', got 'many'"):
        S.ServeOptions.from_args({"checkpoints": ["a"], "replicas": "many"})
    with pytest.raises(ValueError, match="nothing to serve"):
        S.ServeOptions.from_args({})
    with pytest.raises(ValueError, match="invalid model name '../x'"):
        S.ServeOptions.from_args({"checkpoints": ["a"], "names": ["../x"]})
    with pytest.raises(ValueError, match="max_replicas 1 is below"):
        S.ServeOptions.from_args({"checkpoints": ["a"], "replicas": 2, "max_replicas": 1})


def test_default_names_get_suffixes_and_explicit_duplicates_fail(tmp_path):
    a = _save_checkpoint(tmp_path / "a", "tiny", {"image_size": 32})
    b = _save_checkpoint(tmp_path / "b", "tiny", {"image_size": 32})
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"checkpoint": str(a)}))
    names = [e.name for e in S.resolve_models(S.ServeOptions.from_args({"checkpoints": [a, b, run]}))]
    assert names == ["autoencoder", "autoencoder-2", "autoencoder-3"]
    names = [
        e.name
        for e in S.resolve_models(
            S.ServeOptions.from_args({"checkpoints": [a, b], "names": ["autoencoder-2"]})
        )
    ]
    assert names == ["autoencoder-2", "autoencoder"]
    with pytest.raises(ValueError, match="duplicate model name 'x'"):
        S.resolve_models(S.ServeOptions.from_args({"checkpoints": [a, b], "names": ["x", "x"]}))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "best.json").write_text(json.dumps({"checkpoint": str(b)}))
    entries = S.resolve_models(S.ServeOptions.from_args({"best": [sweep]}))
    assert entries[0].path == str((b / "model.pt").resolve())
    with pytest.raises(FileNotFoundError, match="no best.json"):
        S.ServeOptions.from_args({"best": [tmp_path]}).references()


def test_app_builds_with_autoscaling_and_gpu_replicas(tmp_path):
    from ray.serve import Application

    a = _save_checkpoint(tmp_path / "a", "tiny", {"image_size": 32})
    # Serve validates deployment options (autoscaling_config, ray_actor_options) as the app is built.
    app = S.build_model_app(
        {"checkpoints": [str(a)], "replicas": "auto", "max_replicas": 3, "gpus_per_replica": 1}
    )
    assert isinstance(app, Application)
    app = S.build_model_app(
        {"checkpoints": [str(a)], "replicas": 2, "max_batch_size": 1, "gpus_per_replica": "auto"}
    )
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="exactly one model"):
        S.build_model_app({"checkpoints": [str(a), str(a)]})
    assert isinstance(S.build_index_app({"models": {"a": "medood-a"}}), Application)
    with pytest.raises(ValueError, match="needs 'models'"):
        S.build_index_app({})


def test_config_file_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG_FILE.read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    index, *models = schema.applications
    assert index.import_path == "medood.platform.serve:build_index_app" and index.route_prefix == "/"
    routed = {}
    for app in models:
        assert app.import_path == "medood.platform.serve:build_model_app"
        options = S.ServeOptions.from_args(app.args)
        (name,) = options.names
        assert app.route_prefix == f"/v1/models/{name}" and len(options.checkpoints) == 1
        routed[name] = app.name
    assert routed == index.args["models"] == {"digits": "medood-digits", "brain3d": "medood-brain3d"}


def test_token_check_is_off_without_a_token_and_constant_time_with_one():
    import hashlib

    S.authorize(None, None)  # no MEDOOD_API_TOKEN: no header needed
    digest = hashlib.sha256(b"s3cret").hexdigest()
    S.authorize("Bearer s3cret", digest)
    S.authorize("bearer s3cret", digest)
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(S.InputError) as caught:
            S.authorize(header, digest)
        assert caught.value.status == 401


def test_sniffing_and_header_checks_without_ray():
    volume = nib.Nifti1Image(
        np.random.default_rng(0).random((6, 7, 8), dtype=np.float32), np.eye(4)
    ).to_bytes()
    assert S.sniff_format(volume) == "nifti"
    assert S.sniff_format(gzip.compress(volume)) == "nifti-gz"
    assert S.sniff_format(_png(np.zeros((4, 4), np.uint8))) == "png"
    for body, status in (
        (b"GIF89a....", 415),
        (volume[:100], 400),
        (gzip.compress(b"plain text"), 415),
        (b"\x1f\x8b" + b"\x00" * 30, 400),
    ):
        with pytest.raises(S.InputError) as caught:
            S.sniff_format(body)
        assert caught.value.status == status


# --- the served app --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from medood.platform.jobs import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Raw files and their shards: digitanatomy PNGs, synthetic-brain NIfTIs, two DICOM files."""
    from medood.platform.data.ingest import ingest
    from medood.platform.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("serve-data")
    out: dict[str, dict[str, Path]] = {}
    for kind, sizes in (
        ("digitanatomy", {"n_train": 4, "n_test": 4, "size": 32}),
        ("synthetic-brain", {"n_train": 2, "n_test": 2, "size": 24}),
    ):
        layout = synthesize(kind, root / kind, seed=0, **sizes)
        ingest(layout, root / kind, root / f"{kind}-shards", seed=0, progress=False)
        out[kind] = {"raw": root / kind, "shards": root / f"{kind}-shards"}
    import pydicom.data

    dicom = root / "dicom"
    (dicom / "normal" / "a").mkdir(parents=True)
    (dicom / "normal" / "b").mkdir(parents=True)
    (dicom / "normal" / "a" / "ct.dcm").write_bytes(
        Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    )
    (dicom / "normal" / "b" / "jane.dcm").write_bytes(_dicom(_ramp(48, 40)))
    ingest("folder", dicom, root / "dicom-shards", seed=0, progress=False)
    out["dicom"] = {"raw": dicom, "shards": root / "dicom-shards"}
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-ckpt")
    return {
        "ae2d": _save_checkpoint(root / "ae2d", "tiny", {"image_size": 32}, calibrate_on=_ramp(32, 32)),
        "ae3d": _save_checkpoint(root / "ae3d", "tiny3d", {"image_size": 16}, calibrate_on=_ramp3d(16)),
    }


@pytest.fixture(scope="module")
def app(ray_local, checkpoints) -> str:
    """The Serve app on 127.0.0.1 and a free port, built with MEDOOD_API_TOKEN set."""
    import os

    from ray import serve

    os.environ[S.TOKEN_ENV] = TOKEN
    try:
        options = S.ServeOptions.from_args(
            {
                "checkpoints": [str(checkpoints["ae2d"]), str(checkpoints["ae3d"])],
                "names": ["ae2d", "ae3d"],
                "cpus_per_replica": 0.25,  # leave CPUs to Ray Data (score_split) on 2 cores
                "gpus_per_replica": 0,
                "max_batch_size": 4,
                "batch_wait_ms": 20,
                "max_body_mb": MAX_BODY_MB,
                "max_voxels": MAX_VOXELS,
            }
        )
        served = S.start_app(options, host="127.0.0.1", port=_free_port())
    finally:
        os.environ.pop(S.TOKEN_ENV, None)
    yield served.url
    serve.shutdown()


def test_health_and_model_list(app, checkpoints):
    health = requests.get(f"{app}/healthz", timeout=30)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and set(body["models"]) == {"ae2d", "ae3d"}
    assert all(m["pid"] and m["replica"] for m in body["models"].values())
    listed = requests.get(f"{app}/v1/models", headers=AUTH, timeout=30).json()["models"]
    by_name = {m["name"]: m for m in listed}
    assert by_name["ae3d"]["method"] == "autoencoder"
    assert by_name["ae3d"]["config"]["spatial_dims"] == 3
    assert by_name["ae2d"]["metrics"] == {"val_auroc": 0.5}
    assert by_name["ae2d"]["checkpoint"] == str((checkpoints["ae2d"] / "model.pt").resolve())
    assert requests.get(f"{app}/v1/models/ae2d", headers=AUTH, timeout=30).json()["name"] == "ae2d"


def test_served_scores_equal_evaluation(app, data, checkpoints):
    from medood.platform.evaluate import pool_cases

    cases = []  # (model, file, expected calibrated score, expected raw score, content type)
    for dataset, model, content_type in (
        ("digitanatomy", "ae2d", "image/png"),
        ("synthetic-brain", "ae3d", "application/gzip"),
        ("dicom", "ae2d", "application/dicom"),
    ):
        for sample_id, score, raw in _evaluated(checkpoints[model], data[dataset]["shards"]):
            cases.append((model, data[dataset]["raw"] / sample_id, score, raw, content_type))
    # A 2D method on volumes: slices scored like evaluation, pooled with max like pool_cases.
    slices = _scored_split(checkpoints["ae2d"], data["synthetic-brain"]["shards"])
    for scored in slices:
        ids, _, pooled = pool_cases(scored)
        for case_id, score in zip(ids, pooled):
            cases.append(("ae2d", data["synthetic-brain"]["raw"] / case_id, float(score), None, None))
    covered = {(model, "".join(path.suffixes[-2:]), raw is None) for model, path, _, raw, _ in cases}
    assert covered == {
        ("ae2d", ".png", False),
        ("ae3d", ".nii.gz", False),
        ("ae2d", ".dcm", False),
        ("ae2d", ".nii.gz", True),
    }

    for model, path, score, raw, content_type in cases:
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        response = requests.post(
            f"{app}/v1/models/{model}/score", data=path.read_bytes(), headers=headers, timeout=60
        )
        assert response.status_code == 200, (path.name, response.text)
        body = response.json()
        assert body["score"] == pytest.approx(score, abs=1e-5), path
        if raw is not None:
            assert body["raw_score"] == pytest.approx(raw, rel=1e-5, abs=1e-7), path
        assert 0.0 <= body["score"] <= 1.0
        assert body["anomalous"] == (body["score"] >= body["threshold"])
        assert body["model"] == model and body["checkpoint"].endswith("model.pt")
        if raw is None:
            assert body["slices"]["pooling"] == "max" and body["slices"]["scored"] >= 1


def test_concurrent_requests_are_batched_without_changing_scores(app, data):
    files = sorted((data["digitanatomy"]["raw"] / "normal").glob("*.png"))[:4]
    bodies = [f.read_bytes() for f in files] * 4

    def post(body: bytes) -> float:
        response = requests.post(f"{app}/v1/models/ae2d/score", data=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["score"]

    alone = [post(b) for b in bodies[:4]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(post, bodies))
    assert together == pytest.approx(alone * 4, abs=1e-6)


def test_maps_come_back_in_the_input_space(app, data):
    volume_file = sorted((data["synthetic-brain"]["raw"] / "toy").glob("*.nii.gz"))[0]
    shape = nib.load(volume_file).shape
    for model in ("ae3d", "ae2d"):
        body = _post(app, model, volume_file.read_bytes(), params={"map": "true"}).json()
        assert body["map"]["format"] == "nifti-gz" and body["map"]["shape"] == list(shape)
        image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["map"]["data"])))
        values = np.asarray(image.dataobj)
        assert values.shape == shape and values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0
    picture = sorted((data["digitanatomy"]["raw"] / "abnormal").glob("*.png"))[0]
    body = _post(app, "ae2d", picture.read_bytes(), params={"map": "1"}).json()
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["map"]["data"]))))
    assert body["map"]["format"] == "png" and decoded.shape == Image.open(picture).size[::-1]
    assert "map" not in _post(app, "ae2d", picture.read_bytes()).json()


def test_hostile_payloads_get_4xx_and_no_replica_restarts(app, data):
    before = requests.get(f"{app}/healthz", timeout=30).json()
    payloads = _hostile_payloads(data)
    assert len(payloads) >= 50
    failures = []
    for label, model, body, headers, params, method in payloads:
        url = f"{app}/v1/models/{model}/score"
        try:
            response = requests.request(
                method, url, data=body, headers={**AUTH, **headers}, params=params, timeout=60
            )
        except requests.ConnectionError as error:  # the server may close a refused upload early
            failures.append((label, f"connection error {error}"))
            continue
        ok = 400 <= response.status_code < 500 and "error" in response.json()
        if not ok:
            failures.append((label, response.status_code, response.text[:200]))
        assert "/dev/shm" not in response.text and "medood-upload" not in response.text
    assert not failures, failures
    valid = sorted((data["synthetic-brain"]["raw"] / "toy").glob("*.nii.gz"))[0].read_bytes()
    assert _post(app, "ae3d", valid).status_code == 200
    after = requests.get(f"{app}/healthz", timeout=30).json()
    assert after["index"] == before["index"]
    assert after["models"] == before["models"]


def test_status_codes_say_what_was_wrong(app, data):
    picture = sorted((data["digitanatomy"]["raw"] / "normal").glob("*.png"))[0].read_bytes()
    cases = [
        (_post(app, "ae2d", b"not an image at all" * 10), 415, "unrecognised file type"),
        (_post(app, "ae2d", b""), 400, "empty body"),
        (_post(app, "ae3d", picture), 422, "3D and cannot take a 2D image"),
        (_post(app, "ae3d", _nifti(np.zeros((4, 4, 4, 2), np.float32))), 422, "wrong dimensionality"),
        (_post(app, "ae2d", _dicom(_ramp(8, 8), syntax="1.2.840.10008.1.2.4.100")), 415, "MPEG2"),
        (_post(app, "ae2d", b"\x00" * int(MAX_BODY_MB * 2**20 + 10)), 413, "exceeds the limit"),
        (_post(app, "nope", picture), 404, "unknown model 'nope'; served models: ae2d, ae3d"),
        (
            _post(app, "ae2d", picture, headers={"Content-Type": "text/plain"}),
            415,
            "unsupported content type",
        ),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]


def test_other_valid_encodings_are_accepted(app):
    rng = np.random.default_rng(3)
    gray = (rng.random((40, 30)) * 255).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(gray).save(jpeg, format="JPEG")
    volume = rng.random((12, 10, 14), dtype=np.float32)
    big_endian = nib.Nifti1Image(volume.astype(">f4"), np.eye(4))
    valid = [
        ("ae2d", _png((rng.random((20, 20, 3)) * 255).astype(np.uint8)), {}),  # RGB -> gray, as ingest does
        ("ae2d", _png((rng.random((20, 24)) * 65535).astype(np.uint16)), {}),  # 16-bit gray
        ("ae2d", jpeg.getvalue(), {"Content-Type": "image/jpeg"}),
        ("ae2d", _dicom(_ramp(24, 24)), {"Content-Type": "application/dicom"}),
        ("ae3d", _nifti(volume, version=2), {"Content-Type": "application/octet-stream"}),
        ("ae3d", big_endian.to_bytes(), {}),
        ("ae3d", gzip.compress(_nifti(volume)), {"Content-Type": "application/gzip"}),
        (
            "ae3d",
            gzip.compress(_nifti(volume)),
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),  # curl's default
        ("ae2d", _nifti(volume), {}),  # a volume for a 2D model: slices, max-pooled
    ]
    for model, body, headers in valid:
        response = _post(app, model, body, headers=headers)
        assert response.status_code == 200, response.text
        assert 0.0 <= response.json()["score"] <= 1.0
        assert "decode;dur=" in response.headers["Server-Timing"]


def test_token_is_required_and_checked(app, data):
    picture = sorted((data["digitanatomy"]["raw"] / "normal").glob("*.png"))[0].read_bytes()
    url = f"{app}/v1/models/ae2d/score"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        response = requests.post(url, data=picture, headers=headers, timeout=30)
        assert response.status_code == 401 and "token" in response.json()["error"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{app}/v1/models", timeout=30).status_code == 401
    assert requests.post(url, data=picture, headers=AUTH, timeout=30).status_code == 200
    assert requests.get(f"{app}/healthz", timeout=30).status_code == 200  # probes need no token


def test_no_patient_identity_in_responses(app, data):
    valid = _dicom(_ramp(40, 40))
    responses = [
        _post(app, "ae2d", valid),
        _post(app, "ae2d", valid, params={"map": "true"}),
        _post(app, "ae2d", valid[: len(valid) - 600]),
        _post(app, "ae2d", _dicom(_ramp(8, 8), syntax="1.2.840.10008.1.2.4.100")),
        _post(app, "ae2d", _dicom(_ramp(8, 8), pixel_bytes=b"\x01\x02\x03")),
        _post(app, "ae3d", valid),
    ]
    assert responses[0].status_code == 200
    for response in responses:
        for secret in ("Doe", "Jane", PATIENT_ID, "19700101"):
            assert secret not in response.text


# --- helpers ---------------------------------------------------------------------------------------


def _post(
    app: str, model: str, body: bytes, *, headers: dict[str, str] | None = None, params: dict | None = None
):
    return requests.post(
        f"{app}/v1/models/{model}/score",
        data=body,
        headers={**AUTH, **(headers or {})},
        params=params,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save_checkpoint(
    directory: Path, preset: str, overrides: dict[str, Any], calibrate_on: np.ndarray | None = None
) -> Path:
    """A valid checkpoint from a freshly initialised autoencoder; calibration centred on one input."""
    import torch

    torch.manual_seed(0)
    method = methods.get("autoencoder").build(preset, **overrides).eval()
    spec = InputSpec.from_config(method.config)
    calibration = ckpt.Calibration(threshold=0.5, fitted_on=1)
    if calibrate_on is not None:
        scores = method.score(to_torch_batch(collate(prepare_sample(calibrate_on, None, 0, "c", spec))))
        raw = float(scores.sample[0])
        values = scores.map.numpy()
        calibration = ckpt.Calibration(
            sample_mean=raw,
            sample_std=max(abs(raw) * 0.2, 1e-6),
            map_mean=float(values.mean()),
            map_std=float(values.std() + 1e-6),
            threshold=0.5,
            fitted_on=1,
        )
    ckpt.save(directory, method, calibration=calibration, input_spec=spec, metrics={"val_auroc": 0.5})
    return directory


def _scored_split(checkpoint: Path, shards: Path) -> list[Any]:
    """``score_split`` of the split with the most rows (one Ray Data pass: they are slow on 2 cores)."""
    from medood.platform.evaluate import score_split

    counts = read_manifest(shards)["counts"]
    split = max(("test", "val", "train"), key=lambda s: counts[s]["total"])
    return [score_split(ckpt.load(checkpoint), shards, split)]


def _evaluated(checkpoint: Path, shards: Path) -> list[tuple[str, float, float]]:
    return [
        (sample_id, score, raw)
        for scored in _scored_split(checkpoint, shards)
        for sample_id, score, raw in zip(scored.ids, scored.scores, scored.raw)
    ]


def _ramp(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x + 2 * y) % 37 * 50).astype(np.uint16)


def _ramp3d(side: int) -> np.ndarray:
    z, y, x = np.mgrid[0:side, 0:side, 0:side]
    return ((x + y + z) % 7).astype(np.float32)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _nifti(array: np.ndarray, *, version: int = 1) -> bytes:
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    return cls(array, np.eye(4)).to_bytes()


def _dicom(
    pixels: np.ndarray,
    *,
    syntax: str = "1.2.840.10008.1.2.1",
    pixel_bytes: bytes | None = None,
    rows: int | None = None,
    columns: int | None = None,
    with_pixels: bool = True,
) -> bytes:
    """A secondary-capture DICOM with a patient identity that must never come back."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows or pixels.shape[0], columns or pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if with_pixels:
        data = pixel_bytes if pixel_bytes is not None else pixels.astype("<u2").tobytes()
        ds.PixelData = data if meta.TransferSyntaxUID == ExplicitVRLittleEndian else encapsulate([data])
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _nifti_header_with(dims: tuple[int, ...], *, gz: bool, datatype: int = 16) -> bytes:
    """A NIfTI-1 header declaring ``dims`` (and an optional datatype) followed by a few zeros."""
    header = bytearray(_nifti(np.zeros((2, 2, 2), np.float32))[:352])
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<h", header, 70, datatype)
    body = bytes(header) + b"\x00" * 4096
    return gzip.compress(body) if gz else body


def _hostile_payloads(data: dict[str, dict[str, Path]]) -> list[tuple[str, str, Any, dict, dict, str]]:
    """(label, model, body, headers, params, HTTP method): every one must get a 4xx."""
    rng = np.random.default_rng(7)
    nifti = _nifti(rng.random((12, 12, 12), dtype=np.float32))
    nifti_gz = gzip.compress(nifti)
    png = sorted((data["digitanatomy"]["raw"] / "normal").glob("*.png"))[0].read_bytes()
    jpeg_buffer = io.BytesIO()
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(jpeg_buffer, format="JPEG")
    jpeg = jpeg_buffer.getvalue()
    dicom = (data["dicom"]["raw"] / "normal" / "a" / "ct.dcm").read_bytes()
    rgb = _png((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    tiff_buffer = io.BytesIO()
    frames = [Image.fromarray(np.zeros((8, 8), np.uint8)), Image.fromarray(np.ones((8, 8), np.uint8))]
    frames[0].save(tiff_buffer, format="TIFF", save_all=True, append_images=frames[1:])
    junk = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    big = b"\x00" * int(MAX_BODY_MB * 2**20 + 1024)

    def chunks():
        for _ in range(int(MAX_BODY_MB * 4) + 2):
            yield b"\x00" * 2**18

    nan_volume = rng.random((8, 8, 8), dtype=np.float32)
    nan_volume[2, 3, 4] = np.nan
    inf_volume = rng.random((8, 8, 8), dtype=np.float32)
    inf_volume[0, 0, 0] = np.inf
    post, none = "POST", {}
    cases: list[tuple[str, str, Any, dict, dict, str]] = [
        ("random bytes", "ae2d", junk, none, none, post),
        ("ten random bytes", "ae3d", junk[:10], none, none, post),
        ("zero-size", "ae2d", b"", none, none, post),
        ("one zero byte", "ae2d", b"\x00", none, none, post),
        ("text/plain", "ae2d", b"hello", {"Content-Type": "text/plain"}, none, post),
        ("json", "ae2d", b'{"image": [1, 2]}', {"Content-Type": "application/json"}, none, post),
        (
            "form-urlencoded",
            "ae2d",
            b"a=1&b=2",
            {"Content-Type": "application/x-www-form-urlencoded"},
            none,
            post,
        ),
        (
            "form-urlencoded png",
            "ae3d",
            png,
            {"Content-Type": "application/x-www-form-urlencoded"},
            none,
            post,
        ),
        (
            "multipart",
            "ae2d",
            b"--x\r\n\r\n" + png + b"\r\n--x--",
            {"Content-Type": "multipart/form-data; boundary=x"},
            none,
            post,
        ),
        ("html", "ae2d", b"<html><body>hi</body></html>", {"Content-Type": "text/html"}, none, post),
        ("gif", "ae2d", b"GIF89a" + junk[:200], none, none, post),
        ("png magic + junk", "ae2d", png[:8] + junk, none, none, post),
        ("jpeg magic + junk", "ae2d", b"\xff\xd8\xff" + junk, none, none, post),
        ("bmp magic + junk", "ae2d", b"BM" + junk, none, none, post),
        ("tiff magic + junk", "ae2d", b"II*\x00" + junk, none, none, post),
        ("DICM preamble + junk", "ae2d", b"\x00" * 128 + b"DICM" + junk, none, none, post),
        ("gzip magic + junk", "ae3d", b"\x1f\x8b" + junk, none, none, post),
        ("gzip of random bytes", "ae3d", gzip.compress(junk), none, none, post),
        (
            "gzip of text",
            "ae3d",
            gzip.compress(b"just text\n" * 50),
            {"Content-Type": "application/gzip"},
            none,
            post,
        ),
        ("zlib not gzip", "ae3d", zlib.compress(nifti), none, none, post),
        ("nifti truncated in header", "ae3d", nifti[:100], none, none, post),
        ("nifti header only", "ae3d", nifti[:352], none, none, post),
        ("nifti truncated half", "ae3d", nifti[: len(nifti) // 2], none, none, post),
        ("nifti.gz truncated half", "ae3d", nifti_gz[: len(nifti_gz) // 2], none, none, post),
        ("nifti.gz truncated at 40 bytes", "ae3d", nifti_gz[:40], none, none, post),
        ("png truncated half", "ae2d", png[: len(png) // 2], none, none, post),
        ("png truncated at 30 bytes", "ae2d", png[:30], none, none, post),
        ("jpeg truncated", "ae2d", jpeg[: len(jpeg) // 3], none, none, post),
        ("dicom truncated half", "ae2d", dicom[: len(dicom) // 2], none, none, post),
        ("dicom truncated at 200", "ae2d", dicom[:200], none, none, post),
        ("4D nifti", "ae3d", _nifti(np.zeros((8, 8, 8, 2), np.float32)), none, none, post),
        ("4D nifti, trailing 1", "ae2d", _nifti(np.ones((8, 8, 8, 1), np.float32)), none, none, post),
        ("1D nifti", "ae3d", _nifti(np.ones((100,), np.float32)), none, none, post),
        ("2D nifti for a 3D model", "ae3d", _nifti(np.ones((16, 16), np.float32)), none, none, post),
        ("1x1 png for a 3D model", "ae3d", _png(np.array([[7]], np.uint8)), none, none, post),
        ("RGB png for a 3D model", "ae3d", rgb, none, none, post),
        ("2D dicom for a 3D model", "ae3d", dicom, none, none, post),
        ("NaN voxel", "ae3d", _nifti(nan_volume), none, none, post),
        ("infinite voxel", "ae2d", _nifti(inf_volume), none, none, post),
        ("empty volume for a 2D model", "ae2d", _nifti(np.zeros((16, 16, 16), np.float32)), none, none, post),
        ("nifti dim[0] = 0", "ae3d", _nifti_header_with((), gz=False), none, none, post),
        ("nifti negative dimension", "ae3d", _nifti_header_with((8, -8, 8), gz=False), none, none, post),
        (
            "nifti unknown datatype",
            "ae3d",
            _nifti_header_with((8, 8, 8), gz=False, datatype=9999),
            none,
            none,
            post,
        ),
        (
            "nifti.gz bomb (1000^3 declared)",
            "ae3d",
            _nifti_header_with((1000, 1000, 1000), gz=True),
            none,
            none,
            post,
        ),
        ("png bomb", "ae2d", _png(np.zeros((1500, 1500), np.uint8)), none, none, post),
        (
            "dicom bomb (huge Rows x Columns)",
            "ae2d",
            _dicom(_ramp(4, 4), rows=60000, columns=60000),
            none,
            none,
            post,
        ),
        (
            "dicom MPEG2 transfer syntax",
            "ae2d",
            _dicom(_ramp(8, 8), syntax="1.2.840.10008.1.2.4.100"),
            none,
            none,
            post,
        ),
        (
            "dicom unknown transfer syntax",
            "ae2d",
            _dicom(_ramp(8, 8), syntax="1.2.3.4.5.6.7"),
            none,
            none,
            post,
        ),
        ("dicom without pixel data", "ae2d", _dicom(_ramp(8, 8), with_pixels=False), none, none, post),
        (
            "dicom with short pixel data",
            "ae2d",
            _dicom(_ramp(8, 8), pixel_bytes=b"\x01\x02\x03\x04"),
            none,
            none,
            post,
        ),
        ("multi-page tiff", "ae2d", tiff_buffer.getvalue(), none, none, post),
        ("oversized, Content-Length", "ae2d", big, none, none, post),
        ("oversized, chunked", "ae2d", chunks(), none, none, post),
        ("png declared, nifti sent", "ae3d", nifti, {"Content-Type": "image/png"}, none, post),
        ("dicom declared, png sent", "ae2d", png, {"Content-Type": "application/dicom"}, none, post),
        ("gzip declared, raw nifti sent", "ae3d", nifti, {"Content-Type": "application/gzip"}, none, post),
        ("jpeg declared, png sent", "ae2d", png, {"Content-Type": "image/jpeg"}, none, post),
        ("unknown model", "squid-9000", png, none, none, post),
        ("path-like model name", "..%2F..%2Fetc%2Fpasswd", png, none, none, post),
        (
            "path-like file name header",
            "ae2d",
            junk,
            {"Content-Disposition": 'attachment; filename="../../etc/passwd"'},
            none,
            post,
        ),
        (
            "path-like file name query",
            "ae2d",
            junk,
            none,
            {"filename": "/etc/passwd", "path": "../../x"},
            post,
        ),
        ("bad map flag", "ae2d", png, none, {"map": "maybe"}, post),
        ("GET on score", "ae2d", None, none, none, "GET"),
        ("PUT on score", "ae2d", png, none, none, "PUT"),
        ("DELETE on score", "ae2d", None, none, none, "DELETE"),
    ]
    return cases
