"""Ray Serve deployment of checkpoints: POST a scan, get its anomaly score and, on request, its map.

Every served model is its own Serve application holding one ``ModelServer`` deployment
(``build_model_app``), mounted at ``/v1/models/{name}``; a small index application
(``build_index_app``, mounted at ``/``) answers ``/healthz`` and ``/v1/models``. Scans therefore go
from Serve's HTTP proxy straight to the model's replica: no gateway hop, no extra copy of a large
volume. A ``ModelServer`` replica checks the token and the body size, decodes the upload with the
byte-level reader that ingest uses (``medood.platform.data.readers.read_bytes``: sniffing, header
checks, decoding; this module keeps HTTP, Serve and auth only), preprocesses it with
``prepare_sample`` and the checkpoint's ``input_spec`` (the path training and evaluation use),
batches forward passes across requests with ``@serve.batch``, and maps raw scores to [0, 1] with
the checkpoint's calibration (``calibration.sample``, as the MOOD writer does). So a served score
equals ``medood evaluate``'s score of the same file. ``start_app`` (``medood serve``) runs all the
applications; ``serve_config.yaml`` lists the same ones for ``serve run`` / ``serve deploy``.

HTTP API (every error is a JSON ``{"error": "..."}`` with a 4xx status for bad input):

``POST /v1/models/{name}/score[?map=true]``
    Body: the file itself. DICOM (``application/dicom``, Part 10 with the ``DICM`` preamble),
    NIfTI-1/2 (``.nii`` or gzipped ``.nii.gz``; ``application/gzip`` or ``application/octet-stream``),
    PNG, JPEG, BMP or TIFF (``image/png``, ``image/jpeg``, ...), or ``application/octet-stream`` /
    no Content-Type, which is sniffed from the magic bytes. A declared type must match the bytes.
    Returns ``model``, ``method``, ``checkpoint``, ``score`` (in [0, 1]), ``raw_score``,
    ``threshold`` (the checkpoint's validation-chosen threshold in [0, 1]), ``anomalous``
    (``score >= threshold``) and ``input`` (format and shape). A 2D method given a volume scores
    its slices along the spec's ``slice_axis`` (background slices skipped), exactly as evaluation
    does, and the volume's score is the maximum over slices (evaluation's ``pool_cases``); then
    ``slices`` gives the axis, the number scored and the index of the maximum. With ``map=true``
    the response also holds ``map``: the calibrated map resized to the input's shape (as the MOOD
    writer does), base64-encoded, gzipped NIfTI (float32 in [0, 1], the reader's affine) for
    volumes, 16-bit gray PNG (value / 65535) for 2D images.
``GET /v1/models`` (and ``GET /v1/models/{name}``)
    The served models: name, method, checkpoint, resolved config, validation metrics,
    threshold, calibration and input spec.
``GET /healthz``
    ``{"status": "ok", "index": {...}, "models": {name: {...}}}`` with each replica's id, pid and
    start-up id; 503 when a model replica does not answer. Needs no token.

Status codes: 400 malformed body (empty, truncated, corrupt); 401 missing or wrong token;
404 unknown model or route; 405 wrong method; 413 body over ``max_body_mb``, or an image whose
header declares more than ``max_voxels`` voxels (decompression bombs are refused before decoding);
415 unsupported content type, unrecognised bytes, or a DICOM transfer syntax with no installed
decoder; 422 a readable image the model cannot take (wrong dimensionality, a 2D image for a 3D
model, no foreground slice, non-finite values); 503 a model whose application is not running.
A 500 means a bug, never bad input; a replica never dies of an upload.

Security: with ``MEDOOD_API_TOKEN`` set in the environment of the process that builds the
applications, every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (compared with
``hmac.compare_digest``; only a SHA-256 of the token reaches the replicas). ``medood serve``
binds 127.0.0.1 unless told otherwise. Checkpoints load with ``torch.load(weights_only=True)``.
Uploads are decoded in memory, never written to disk; client file names are never used. Nothing
logs headers or bodies, and error messages name no DICOM header value (the reader's messages name
tags, never values, and are scrubbed of the upload's identity values).

Model names: the method name by default; ``names`` (``--name``, in the order of the models:
every ``--checkpoint``, then every ``--best``) override them. Explicit names must be unique; a
default name already taken gets a numeric suffix (``autoencoder``, ``autoencoder-2``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import hmac
import io
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import typer

from medood.platform.data.readers import (
    DEFAULT_MAX_VOXELS,
    FORMAT_NAMES,
    CorruptImageError,
    DimensionalityError,
    ImageReadError,
    ImageTooLargeError,
    NoImageError,
    UnsupportedFormatError,
    read_bytes,
)
from medood.platform.data.readers import sniff_format as _sniff

logger = logging.getLogger("medood.serve")

TOKEN_ENV = "MEDOOD_API_TOKEN"
DEFAULT_APP_NAME = "medood"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MODEL_DEPLOYMENT = "model"  # the deployment's name inside each model's application
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# On a CPU, convolutions over a batch much larger than this many input values are memory-bound and
# cost more per sample than smaller passes (a tiny 3D autoencoder: 9.9 ms per 64^3 volume alone or
# in fours, 16.7 ms in sixteens; 2D 128^2 images keep getting cheaper up to 64 per pass).
CPU_CHUNK_ELEMENTS = 2**20

#: Declared Content-Types -> the formats the body may then be (None: sniff any).
CONTENT_TYPES: dict[str, frozenset[str] | None] = {
    "application/octet-stream": None,
    # What `curl --data-binary @file` sends unless told otherwise: no real claim about the bytes.
    "application/x-www-form-urlencoded": None,
    "application/dicom": frozenset({"dicom"}),
    "application/gzip": frozenset({"nifti-gz"}),
    "application/x-gzip": frozenset({"nifti-gz"}),
    "application/x-nifti": frozenset({"nifti", "nifti-gz"}),
    "image/png": frozenset({"png"}),
    "image/jpeg": frozenset({"jpeg"}),
    "image/bmp": frozenset({"bmp"}),
    "image/tiff": frozenset({"tiff"}),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class InputError(Exception):
    """Bad input: an HTTP status (4xx) and a message that names what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- options -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    """What ``medood serve`` and the Serve config's ``args`` set (the same names, snake_case).

    checkpoints: model references, as ``medood evaluate`` takes them (checkpoint folder,
        ``model.pt``, run folder, ``best.json``).
    best: sweep folders; each serves the checkpoint its ``best.json`` names.
    names: model names, in the order checkpoints then best; missing ones default to the method.
    replicas: replicas per model, or ``"auto"`` (autoscaling from 1 to ``max_replicas``).
    max_replicas: with it, replicas autoscale between ``replicas`` (1 for auto) and this.
    gpus_per_replica: GPUs each model replica reserves; ``"auto"``: 1 when the cluster has a GPU.
    cpus_per_replica: CPUs each model replica reserves (also its torch threads).
    max_batch_size: requests per batched forward pass (1: unbatched).
    batch_wait_ms: how long a batch waits to fill.
    max_body_mb: the largest request body accepted (413 above).
    max_voxels: the largest image / volume accepted, by its header, before decoding (413 above).
    """

    checkpoints: tuple[str, ...] = ()
    best: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    replicas: int | str = 1
    max_replicas: int | None = None
    gpus_per_replica: float | str = "auto"
    cpus_per_replica: float = 1.0
    max_batch_size: int = 8
    batch_wait_ms: float = 2.0
    max_body_mb: float = 256.0
    max_voxels: int = DEFAULT_MAX_VOXELS

    @classmethod
    def from_args(cls, args: dict[str, Any] | ServeOptions | None) -> ServeOptions:
        """Validate a Serve config's ``args`` (or CLI values); errors name the bad value."""
        if isinstance(args, ServeOptions):
            return args.validated()
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(
                f"unknown serve option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for key, value in args.items():
            if key in ("checkpoints", "best", "names"):
                if value is None:
                    value = ()
                if isinstance(value, (str, os.PathLike)):
                    value = (value,)
                values[key] = tuple(str(v) for v in value)
            elif value is not None or key == "max_replicas":
                values[key] = value
        return cls(**values).validated()

    def validated(self) -> ServeOptions:
        replicas: int | str = self.replicas
        if isinstance(replicas, str) and replicas.strip().lower() != "auto":
            try:
                replicas = int(replicas)
            except ValueError:
                raise ValueError(
                    f"replicas must be a positive integer or 'auto', got {self.replicas!r}"
                ) from None
        if isinstance(replicas, str):
            replicas = "auto"
        elif isinstance(replicas, bool) or int(replicas) < 1:
            raise ValueError(f"replicas must be a positive integer or 'auto', got {self.replicas!r}")
        max_replicas = None if self.max_replicas is None else int(self.max_replicas)
        low = 1 if replicas == "auto" else int(replicas)
        if max_replicas is not None and max_replicas < low:
            raise ValueError(f"max_replicas {max_replicas} is below the minimum number of replicas {low}")
        gpus: float | str = self.gpus_per_replica
        if isinstance(gpus, str) and gpus.strip().lower() == "auto":
            gpus = "auto"
        else:
            try:
                gpus = float(gpus)
            except (TypeError, ValueError):
                raise ValueError(
                    f"gpus_per_replica must be a number >= 0 or 'auto', got {self.gpus_per_replica!r}"
                ) from None
            if gpus < 0:
                raise ValueError(f"gpus_per_replica must be >= 0, got {gpus}")
        checks = {
            "cpus_per_replica": (float(self.cpus_per_replica), 0.0),
            "max_batch_size": (int(self.max_batch_size), 1),
            "batch_wait_ms": (float(self.batch_wait_ms), 0.0),
            "max_body_mb": (float(self.max_body_mb), 1e-6),
            "max_voxels": (int(self.max_voxels), 1),
        }
        for key, (value, minimum) in checks.items():
            if value < minimum:
                raise ValueError(f"{key} must be >= {minimum}, got {value}")
        if not self.checkpoints and not self.best:
            raise ValueError(
                "nothing to serve: give at least one checkpoint (--checkpoint) or sweep (--best)"
            )
        for name in self.names:
            _check_name(name)
        if len(self.names) > len(self.checkpoints) + len(self.best):
            raise ValueError(
                f"{len(self.names)} names given for {len(self.checkpoints) + len(self.best)} models"
            )
        return dataclasses.replace(
            self,
            replicas=replicas,
            max_replicas=max_replicas,
            gpus_per_replica=gpus,
            cpus_per_replica=float(self.cpus_per_replica),
            max_batch_size=int(self.max_batch_size),
            batch_wait_ms=float(self.batch_wait_ms),
            max_body_mb=float(self.max_body_mb),
            max_voxels=int(self.max_voxels),
        )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def references(self) -> list[str]:
        """Every model reference in serving order: checkpoints, then each sweep's best.json."""
        from medood.platform.checkpoint import BEST_FILE
        from medood.platform.storage import location

        refs = list(self.checkpoints)
        for sweep in self.best:
            path = location(sweep)  # a local folder or s3://bucket/prefix
            best = path if path.is_file() else path / BEST_FILE
            if not best.is_file():
                raise FileNotFoundError(
                    f"{sweep}: no {BEST_FILE}; --best expects a sweep folder written by `medood tune`"
                )
            refs.append(str(best))
        return refs

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's autoscaling config when replicas autoscale, else None (a fixed ``num_replicas``)."""
        if self.replicas != "auto" and self.max_replicas is None:
            return None
        low = 1 if self.replicas == "auto" else int(self.replicas)
        high = self.max_replicas if self.max_replicas is not None else max(low, 4)
        return {
            "min_replicas": low,
            "initial_replicas": low,
            "max_replicas": high,
            # A replica is busy enough to add another once about one batch is waiting on it.
            "target_ongoing_requests": max(2, self.max_batch_size),
        }


@dataclass
class ModelEntry:
    """One model to serve: its name, resolved ``model.pt`` and what ``GET /v1/models`` shows."""

    name: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)


def resolve_models(options: ServeOptions) -> list[ModelEntry]:
    """Load every reference once (fail fast on a bad checkpoint) and assign unique names."""
    from medood.platform import checkpoint as ckpt

    loaded = []
    for ref in options.references():
        model = ckpt.load(ref)
        loaded.append((model.path, model))  # an absolute path (symlinks resolved) or a URI
    explicit = list(options.names)
    seen: dict[str, int] = {}
    for position, name in enumerate(explicit):
        if name in seen:
            raise ValueError(
                f"duplicate model name {name!r} (models {seen[name] + 1} and {position + 1}); names must be unique"
            )
        seen[name] = position
    taken = set(explicit)
    entries = []
    for position, (path, model) in enumerate(loaded):
        if position < len(explicit):
            name = explicit[position]
        else:
            name, suffix = model.name, 2
            while name in taken:
                name, suffix = f"{model.name}-{suffix}", suffix + 1
            taken.add(name)
        entries.append(ModelEntry(name=name, path=path, info=describe_model(name, path, model)))
    return entries


def describe_model(name: str, path: str, model: Any) -> dict[str, Any]:
    """What ``GET /v1/models`` lists for one model."""
    config = dataclasses.asdict(model.method.config)
    return {
        "name": name,
        "method": model.name,
        "checkpoint": path,
        "config": _jsonable(config),
        "metrics": _jsonable(model.metrics),
        "threshold": float(model.calibration.threshold),
        "calibration": _jsonable(dataclasses.asdict(model.calibration)),
        "input_spec": _jsonable(model.input_spec.to_dict()),
        "routes": {"score": f"/v1/models/{name}/score"},
    }


# --- the applications ---------------------------------------------------------------------------------


def build_index_app(args: dict[str, Any]) -> Any:
    """The index application (route prefix ``/``): ``/healthz``, ``/v1/models`` and JSON 404s.

    ``args``: ``models``, a mapping of model name -> the name of the Serve application that serves
    it (``build_model_app``). Serve config ``import_path: medood.platform.serve:build_index_app``.
    """
    from ray import serve

    models = dict((args or {}).get("models") or {})
    unknown = sorted(set(args or {}) - {"models"})
    if unknown:
        raise ValueError(f"unknown index option(s) {', '.join(map(repr, unknown))}; known: models")
    if not models:
        raise ValueError("the index needs 'models': a mapping of model name -> application name")
    for name in models:
        _check_name(name)
    deployment = serve.deployment(Index).options(
        name="index", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64
    )
    return deployment.bind({str(k): str(v) for k, v in models.items()}, _token_sha256())


def build_model_app(args: dict[str, Any] | ServeOptions) -> Any:
    """One model's application (route prefix ``/v1/models/{name}``): ``POST .../score``.

    ``args`` are ``ServeOptions`` fields with exactly one model (one ``checkpoints`` entry or one
    ``best`` sweep, and at most one ``names`` entry). Serve config
    ``import_path: medood.platform.serve:build_model_app``.
    """
    options = ServeOptions.from_args(args)
    if len(options.checkpoints) + len(options.best) != 1:
        raise ValueError(
            "build_model_app serves exactly one model; list one application per model in the config"
        )
    entry = resolve_models(options)[0]
    return _model_application(entry, options, _token_sha256())


@dataclass
class ServedApp:
    """Running applications: the base URL, the models, and the Serve application names."""

    url: str
    models: list[ModelEntry]
    applications: list[str]


def start_app(
    options: ServeOptions,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    app_name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
) -> ServedApp:
    """Start Serve on (host, port) on the current Ray (a local one if none) and run every application.

    The index runs as ``app_name`` at ``route_prefix``; model ``m`` as ``{app_name}-m`` at
    ``{route_prefix}/v1/models/m``. Serve keeps the HTTP options of its first start on a cluster.
    """
    from ray import serve

    from medood.platform.jobs import ensure_ray

    options = ServeOptions.from_args(options)
    options.references()  # missing files fail here, before Ray starts
    ensure_ray()
    entries = resolve_models(options)
    token = _token_sha256()
    prefix = "/" + route_prefix.strip("/") if route_prefix.strip("/") else ""
    apps = {entry.name: f"{app_name}-{entry.name}" for entry in entries}
    targets = [
        serve.RunTarget(target=build_index_app({"models": apps}), name=app_name, route_prefix=prefix or "/")
    ]
    for entry in entries:
        targets.append(
            serve.RunTarget(
                target=_model_application(entry, options, token),
                name=apps[entry.name],
                route_prefix=f"{prefix}/v1/models/{entry.name}",
            )
        )
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run_many(targets, blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return ServedApp(
        url=f"http://{shown}:{int(port)}{prefix}", models=entries, applications=[t.name for t in targets]
    )


def resolve_gpus(value: float | str) -> float:
    """``"auto"`` -> 1 when the Ray cluster (or, without Ray, this machine) has a GPU, else 0."""
    if value != "auto":
        return float(value)
    try:
        import ray

        if ray.is_initialized():
            return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    except Exception:  # no Ray: look at this machine
        pass
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def serve_command(
    checkpoint: list[str] = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="A checkpoint folder, model.pt, run folder or best.json, local or s3://... (repeatable).",
    ),
    best: list[str] = typer.Option(
        None, "--best", help="A sweep folder (local or s3://...); serves the checkpoint its best.json names (repeatable)."
    ),
    host: str = typer.Option(DEFAULT_HOST, help="Address to bind; 0.0.0.0 exposes the API to the network."),
    port: int = typer.Option(DEFAULT_PORT, help="HTTP port."),
    replicas: str = typer.Option(
        "1", help="Replicas per model, or 'auto' (autoscale from 1 to --max-replicas)."
    ),
    max_replicas: int = typer.Option(None, help="Autoscale each model between --replicas and this."),
    gpus_per_replica: str = typer.Option(
        "auto", help="GPUs per model replica; 'auto': 1 when the cluster has a GPU."
    ),
    cpus_per_replica: float = typer.Option(1.0, help="CPUs per model replica (also its torch threads)."),
    max_batch_size: int = typer.Option(8, help="Requests per batched forward pass (1: unbatched)."),
    batch_wait_ms: float = typer.Option(2.0, help="How long a batch waits to fill, in milliseconds."),
    max_body_mb: float = typer.Option(256.0, help="Largest request body (413 above)."),
    max_voxels: int = typer.Option(
        DEFAULT_MAX_VOXELS, help="Largest image/volume, by its header, before decoding (413 above)."
    ),
    name: list[str] = typer.Option(
        None, "--name", help="Model name, in order: every --checkpoint, then every --best (repeatable)."
    ),
) -> None:
    """Serve checkpoints over HTTP with Ray Serve until Ctrl-C (POST /v1/models/{name}/score)."""
    from ray import serve

    options = ServeOptions.from_args(
        {
            "checkpoints": [str(p) for p in checkpoint or []],
            "best": [str(p) for p in best or []],
            "names": list(name or []),
            "replicas": replicas,
            "max_replicas": max_replicas,
            "gpus_per_replica": gpus_per_replica,
            "cpus_per_replica": cpus_per_replica,
            "max_batch_size": max_batch_size,
            "batch_wait_ms": batch_wait_ms,
            "max_body_mb": max_body_mb,
            "max_voxels": max_voxels,
        }
    )
    served = start_app(options, host=host, port=port)
    typer.echo(f"medood serve: {served.url}")
    for entry in served.models:
        typer.echo(f"  {entry.name} ({entry.info['method']}): POST {served.url}/v1/models/{entry.name}/score")
    if not os.environ.get(TOKEN_ENV) and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: {host} is reachable from the network and {TOKEN_ENV} is not set: anyone can call the API",
            err=True,
        )
    typer.echo("Ctrl-C to stop.")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        for application in served.applications:
            serve.delete(application)


def _model_application(entry: ModelEntry, options: ServeOptions, token_sha256: str | None) -> Any:
    """The ``ModelServer`` deployment of one model, with its replicas, batching and limits."""
    from ray import serve

    gpus = resolve_gpus(options.gpus_per_replica)
    settings = {
        "max_batch_size": options.max_batch_size,
        "batch_wait_ms": options.batch_wait_ms,
        "max_voxels": options.max_voxels,
        "max_body_bytes": options.max_body_bytes,
        "cpus": options.cpus_per_replica,
        "gpus": gpus,
        "token_sha256": token_sha256,
    }
    scaling: dict[str, Any] = {}
    autoscaling = options.autoscaling_config()
    if autoscaling is None:
        scaling["num_replicas"] = int(options.replicas)
    else:
        scaling["autoscaling_config"] = autoscaling
    actor_options: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if gpus > 0:
        actor_options["num_gpus"] = gpus
    deployment = serve.deployment(ModelServer).options(
        name=MODEL_DEPLOYMENT,
        ray_actor_options=actor_options,
        # Well above max_batch_size, or batches never fill.
        max_ongoing_requests=max(8, 2 * options.max_batch_size),
        **scaling,
    )
    return deployment.bind(entry.path, entry.name, settings)


def _token_sha256() -> str | None:
    """SHA-256 of ``MEDOOD_API_TOKEN`` from this process's environment (None: no token check)."""
    token = os.environ.get(TOKEN_ENV) or None
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


# --- the deployments ---------------------------------------------------------------------------------


class Index:
    """The ``/`` application: health of every model, the model list, JSON 404s for other routes."""

    def __init__(self, models: dict[str, str], token_sha256: str | None) -> None:
        self.apps = models
        self.token_sha256 = token_sha256
        self.identity = replica_identity()
        self._handles: dict[str, Any] = {}

    async def __call__(self, request: Any) -> Any:
        try:
            return await self._route(request)
        except InputError as error:
            return _error_response(error.status, error.message)
        except Exception as error:  # a bug, not bad input: say so without details
            logger.error("index: internal error (%s)", type(error).__name__)
            return _error_response(500, f"internal error ({type(error).__name__}); see the index replica log")

    async def _route(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        method = request.method.upper()
        path = _route_path(request.scope)
        if path.rstrip("/") == "/healthz":
            _allow(method, "GET")
            return await self._health()
        routes = "routes: GET /healthz, GET /v1/models, GET /v1/models/{name}, POST /v1/models/{name}/score"
        if not path.startswith("/v1/"):
            raise InputError(404, f"no route {_quote(path)}; {routes}")
        authorize(request.headers.get("authorization"), self.token_sha256)
        parts = [p for p in path.split("/") if p]
        if parts == ["v1", "models"]:
            _allow(method, "GET")
            return JSONResponse({"models": [await self._describe(name) for name in self.apps]})
        if len(parts) >= 3 and parts[:2] == ["v1", "models"]:
            name = parts[2]
            if name in self.apps:  # its own application answers these routes while it runs
                raise InputError(503, f"model {name!r} is not running; try again")
            raise InputError(
                404, f"unknown model {_quote(name)}; served models: {', '.join(sorted(self.apps))}"
            )
        raise InputError(404, f"no route {_quote(path)}; {routes}")

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            from ray import serve

            self._handles[name] = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=self.apps[name])
        return self._handles[name]

    async def _describe(self, name: str) -> dict[str, Any]:
        """Asked of the model's replica each time: a redeployed model application shows its new checkpoint."""
        try:
            return await asyncio.wait_for(self._handle(name).info.remote(), timeout=30.0)
        except Exception as error:
            return {"name": name, "status": "unavailable", "error": type(error).__name__}

    async def _health(self) -> Any:
        from starlette.responses import JSONResponse

        models: dict[str, Any] = {}
        healthy = True
        for name in self.apps:
            try:
                models[name] = await asyncio.wait_for(self._handle(name).health.remote(), timeout=10.0)
            except Exception as error:
                healthy = False
                models[name] = {"status": "unavailable", "error": type(error).__name__}
        body = {"status": "ok" if healthy else "degraded", "index": self.identity, "models": models}
        return JSONResponse(body, status_code=200 if healthy else 503)


class ModelServer:
    """One served model, the ingress of its own application (route prefix ``/v1/models/{name}``).

    ``POST /score``: token, body limit, decode, preprocess, batched forward pass, calibrated score
    and map. ``GET /``: the model's description. ``health`` and ``info`` answer the index.
    """

    def __init__(self, reference: str, name: str, settings: dict[str, Any]) -> None:
        import torch
        from ray import serve

        from medood.platform import checkpoint as ckpt

        self.name = name
        self.max_voxels = int(settings.get("max_voxels", DEFAULT_MAX_VOXELS))
        self.max_body_bytes = int(settings.get("max_body_bytes", 256 * 1024 * 1024))
        self.token_sha256 = settings.get("token_sha256")
        gpus = float(settings.get("gpus", 0.0))
        self.device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(round(float(settings.get("cpus", 1.0))))))
        self.model = ckpt.load(reference, self.device)
        self.model.method.eval()
        self.spec = self.model.input_spec
        self.description = describe_model(name, self.model.path, self.model)
        batch_size = int(settings.get("max_batch_size", 8))
        # One forward pass takes at most this many samples (a 2D method's volume brings many slices).
        self.chunk = max(batch_size, int(getattr(self.model.method.config, "batch_size", 1)))
        if self.device.type == "cpu":
            sample_elements = int(self.spec.in_channels) * int(self.spec.image_size) ** int(
                self.spec.spatial_dims
            )
            self.chunk = max(1, min(self.chunk, CPU_CHUNK_ELEMENTS // sample_elements))
        self._score_batch = serve.batch(
            max_batch_size=batch_size,
            batch_wait_timeout_s=float(settings.get("batch_wait_ms", 2.0)) / 1000.0,
        )(self._score_requests)
        self.identity = {**replica_identity(), "device": str(self.device)}
        self._warm_up()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            method = request.method.upper()
            path = _route_path(request.scope).rstrip("/")
            authorize(request.headers.get("authorization"), self.token_sha256)
            if path == "":
                _allow(method, "GET")
                return JSONResponse(self.description)
            if path != "/score":
                raise InputError(
                    404,
                    f"no route {_quote(path)} under /v1/models/{self.name}; use POST /v1/models/{self.name}/score",
                )
            _allow(method, "POST")
            want_map = _parse_flag(request.query_params.get("map"), "map")
            content_type = _media_type(request.headers.get("content-type"))
            if content_type is not None and content_type not in CONTENT_TYPES:
                raise InputError(
                    415,
                    f"unsupported content type {_quote(content_type)}; send the file itself as the body "
                    f"(curl --data-binary @scan.nii.gz, not a form) with one of: {', '.join(CONTENT_TYPES)}",
                )
            started = time.perf_counter()
            body = await read_body(request, self.max_body_bytes)
            timings = {"body": time.perf_counter() - started}
            status, payload = await self.score(body, content_type, want_map, timings=timings)
            timings["total"] = time.perf_counter() - started
            # Server-Timing (W3C): where a request's time went on the replica, for dashboards and benchmarks.
            server_timing = ", ".join(f"{key};dur={value * 1000:.2f}" for key, value in timings.items())
            return JSONResponse(payload, status_code=status, headers={"Server-Timing": server_timing})
        except InputError as error:
            return _error_response(error.status, error.message)
        except Exception as error:  # a bug, not bad input: say so without details
            logger.exception("model %s: internal error (%s)", self.name, type(error).__name__)
            return _error_response(500, f"internal error ({type(error).__name__}); see the replica log")

    async def score(
        self,
        body: bytes,
        content_type: str | None,
        want_map: bool,
        *,
        timings: dict[str, float] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Score one upload; returns (HTTP status, JSON body). Never raises for bad input.

        ``timings`` (optional) receives the seconds spent decoding (``decode``) and in the batch
        queue plus the forward pass (``model``).
        """
        timings = {} if timings is None else timings
        started = time.perf_counter()
        try:
            prepared = await asyncio.to_thread(self.prepare, body, content_type)
        except InputError as error:
            logger.info("model %s: rejected upload (%d)", self.name, error.status)
            return error.status, {"error": error.message}
        except MemoryError:
            return 413, {"error": "the image is too large to decode on this replica"}
        except OSError as error:  # the readers' errors are InputErrors by now: this is the temporary file
            logger.error("model %s: cannot store an upload temporarily (%s)", self.name, type(error).__name__)
            return 503, {"error": "the replica could not store the upload temporarily; try again later"}
        except Exception as error:  # decoding hostile bytes failed in a way the checks did not foresee
            logger.info("model %s: rejected upload (400, %s)", self.name, type(error).__name__)
            return 400, {"error": f"could not read the upload ({type(error).__name__})"}
        decoded = time.perf_counter()
        timings["decode"] = decoded - started
        try:
            raw, maps = await self._score_batch(ScoreItem(prepared.batch, want_map))
            timings["model"] = time.perf_counter() - decoded
            if want_map:  # resizing and encoding a map is real work: off the event loop
                body_json = await asyncio.to_thread(self.respond, prepared, raw, maps, want_map)
            else:
                body_json = self.respond(prepared, raw, maps, want_map)
        except Exception as error:  # the input passed every check: this is a bug
            logger.exception("model %s: scoring failed (%s)", self.name, type(error).__name__)
            return 500, {
                "error": f"internal error while scoring ({type(error).__name__}); see the replica log"
            }
        return 200, body_json

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.identity}

    async def info(self) -> dict[str, Any]:
        return self.description

    # -- steps (public so the benchmark can time the same work in-process) ------------------------

    def prepare(self, body: bytes, content_type: str | None) -> Prepared:
        """Bytes -> the samples the method sees, through the ingest reader and ``prepare_sample``."""
        upload = decode_upload(body, content_type, max_voxels=self.max_voxels)
        return prepare_upload(upload, self.spec, model_name=self.name, max_voxels=self.max_voxels)

    def forward(self, batch: dict[str, np.ndarray], keep_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw sample scores (N,) and raw maps (N, 1, *spatial) of a collated batch, in chunks."""
        import torch

        from medood.platform.data.stream import to_torch_batch

        raws, maps = [], []
        n = len(batch["id"])
        for start in range(0, n, self.chunk):
            part = {key: value[start : start + self.chunk] for key, value in batch.items()}
            with torch.no_grad():
                scores = self.model.method.score(to_torch_batch(part, self.device))
            raws.append(scores.sample.float().cpu().numpy())
            if keep_maps and scores.map is not None:
                maps.append(scores.map.float().cpu().numpy())
        raw = np.concatenate(raws) if raws else np.zeros((0,), np.float32)
        return raw, (np.concatenate(maps) if maps else None)

    def respond(
        self, prepared: Prepared, raw: np.ndarray, maps: np.ndarray | None, want_map: bool
    ) -> dict[str, Any]:
        """The JSON body: calibrated score (max over slices), threshold, and the map on request."""
        calibration = self.model.calibration
        scores = calibration.sample(raw)
        best = int(np.argmax(scores))
        score = float(scores[best])
        threshold = float(calibration.threshold)
        out: dict[str, Any] = {
            "model": self.name,
            "method": self.model.name,
            "checkpoint": self.model.path,
            "score": score,
            "raw_score": float(raw[best]),
            "threshold": threshold,
            "anomalous": bool(score >= threshold),
            "input": {"format": prepared.format, "shape": list(prepared.shape)},
        }
        if prepared.sliced:
            from medood.platform.data.stream import SLICE_ID

            match = SLICE_ID.match(prepared.ids[best])
            out["slices"] = {
                "axis": int(self.spec.slice_axis),
                "scored": len(prepared.ids),
                "pooling": "max",
                "max_index": int(match["index"]) if match else None,
            }
        if want_map:
            if maps is None:
                out["map"] = None
                out["map_note"] = f"method {self.model.name!r} produces no anomaly map"
            else:
                out["map"] = encode_map(prepared, calibration.map(maps), self.spec)
        return out

    # -- helpers --------------------------------------------------------------------------------

    async def _score_requests(self, items: list[ScoreItem]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The ``@serve.batch`` body: one forward pass (in chunks) over every request's samples."""
        return await asyncio.to_thread(self._forward_items, items)

    def _forward_items(self, items: list[ScoreItem]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        batch = {key: np.concatenate([item.batch[key] for item in items]) for key in items[0].batch}
        raw, maps = self.forward(batch, keep_maps=any(item.want_map for item in items))
        results, start = [], 0
        for item in items:
            stop = start + len(item.batch["id"])
            part_maps = None if maps is None or not item.want_map else maps[start:stop]
            results.append((raw[start:stop], part_maps))
            start = stop
        return results

    def _warm_up(self) -> None:
        """One sample through preprocessing and the method, so the first request is not slow."""
        from medood.platform.data.stream import collate, prepare_sample

        shape = (self.spec.image_size,) * self.spec.spatial_dims
        image = np.zeros(shape, dtype=np.float32)
        image[(slice(0, max(1, shape[0] // 2)),) + (slice(None),) * (len(shape) - 1)] = 1.0
        samples = prepare_sample(image, None, -1, "warm-up", self.spec)
        if samples:
            self.forward(collate(samples), keep_maps=True)


@dataclass
class ScoreItem:
    """One request's samples waiting in the batch queue."""

    batch: dict[str, np.ndarray]
    want_map: bool


@dataclass
class Upload:
    """A decoded upload: the reader's output and the sniffed format."""

    image: Any  # medood.platform.data.readers.ImageData
    format: str


@dataclass
class Prepared:
    """An upload turned into model inputs, with what the response and the map need."""

    batch: dict[str, np.ndarray]
    ids: list[str]
    format: str
    shape: tuple[int, ...]
    affine: np.ndarray | None
    sliced: bool


def replica_identity() -> dict[str, Any]:
    """Who answers: the Serve replica id, the process id and an id drawn when this replica started."""
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_tag
    except Exception:  # outside Serve (the benchmark's in-process path)
        replica = None
    return {"replica": replica, "pid": os.getpid(), "instance": uuid.uuid4().hex, "started_at": time.time()}


# --- decoding uploads --------------------------------------------------------------------------------


def sniff_format(body: bytes) -> str:
    """The format of a body from its magic bytes (``readers.sniff_format``), as an ``InputError``."""
    try:
        return _sniff(body)
    except ImageReadError as error:
        raise _input_error(error) from None


def decode_upload(body: bytes, content_type: str | None, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> Upload:
    """Check an upload's declared type against its bytes, then read it with the byte-level reader.

    ``read_bytes`` is what ingest calls too: the same sniffing, header checks (size against
    ``max_voxels`` before decoding, codecs) and decoding, so serving reads a file exactly as
    ingest does. Its failures become 4xx responses (``_input_error``).
    """
    if not body:
        raise InputError(400, "empty body: send the image file as the request body")
    fmt = sniff_format(body)
    allowed = CONTENT_TYPES.get(content_type) if content_type is not None else None
    if content_type is not None and content_type not in CONTENT_TYPES:
        raise InputError(415, f"unsupported content type {_quote(content_type)}")
    if allowed is not None and fmt not in allowed:
        raise InputError(415, f"the body is {FORMAT_NAMES[fmt]} but the Content-Type says {content_type}")
    try:
        image = read_bytes(body, fmt, max_voxels=max_voxels)
    except ImageReadError as error:
        raise _input_error(error) from None
    except MemoryError:
        raise InputError(413, "the image is too large to decode") from None
    return Upload(image=image, format=fmt)


#: The reader's failures as HTTP statuses (the first matching class wins).
_READ_ERROR_STATUS: tuple[tuple[type[ImageReadError], int], ...] = (
    (ImageTooLargeError, 413),
    (UnsupportedFormatError, 415),
    (NoImageError, 422),
    (DimensionalityError, 422),
    (CorruptImageError, 400),
)


def _input_error(error: ImageReadError) -> InputError:
    status = next((code for kind, code in _READ_ERROR_STATUS if isinstance(error, kind)), 400)
    return InputError(status, str(error)[:500])


def prepare_upload(
    upload: Upload, spec: Any, *, model_name: str = "model", max_voxels: int = DEFAULT_MAX_VOXELS
) -> Prepared:
    """A decoded image -> the collated samples of ``prepare_sample`` (with the checkpoint's spec)."""
    from medood.platform.data.stream import collate, prepare_sample

    array = upload.image.array
    shape = tuple(int(s) for s in array.shape)
    if array.ndim not in (2, 3):
        raise InputError(
            422,
            f"wrong dimensionality: the {FORMAT_NAMES[upload.format]} has shape {shape}; models take 2D images or 3D volumes",
        )
    if array.size == 0:
        raise InputError(422, f"the image is empty (shape {shape})")
    if array.ndim == 2 and spec.spatial_dims == 3:
        raise InputError(
            422, f"model {model_name!r} is 3D and cannot take a 2D image of shape {shape}; send a volume"
        )
    sliced = array.ndim == 3 and spec.spatial_dims == 2
    views = shape[spec.slice_axis] if sliced else 1
    model_elements = views * int(spec.in_channels) * int(spec.image_size) ** int(spec.spatial_dims)
    if model_elements > max_voxels:
        raise InputError(
            413,
            f"the volume has {views} slices; preprocessed that is {model_elements} values, over max_voxels {max_voxels}",
        )
    image = np.asarray(array, dtype=np.float32)
    if not np.isfinite(image).all():
        raise InputError(422, "the image holds NaN or infinite values")
    try:
        samples = prepare_sample(image, None, -1, "upload", spec)
    except ValueError as error:
        raise InputError(422, str(error).replace("upload: ", "", 1)) from None
    if not samples:
        raise InputError(
            422,
            f"no slice along axis {spec.slice_axis} of the volume {shape} has at least "
            f"{spec.min_foreground:.0%} foreground; nothing to score",
        )
    return Prepared(
        batch=collate(samples),
        ids=[s["id"] for s in samples],
        format=upload.format,
        shape=shape,
        affine=upload.image.affine,
        sliced=sliced,
    )


def encode_map(prepared: Prepared, calibrated: np.ndarray, spec: Any) -> dict[str, Any]:
    """The calibrated map in the input's shape (as the MOOD writer resizes it), base64-encoded.

    Volumes: gzipped NIfTI, float32 in [0, 1], with the reader's affine (identity without one);
    slices a 2D method skipped (background) stay 0. 2D images: 16-bit gray PNG, value / 65535.
    """
    from medood.platform.data.stream import case_map

    shape = prepared.shape
    result = case_map(zip(prepared.ids, calibrated[:, 0]), shape, spec)
    result = np.clip(np.asarray(result, dtype=np.float32), 0.0, 1.0)
    if len(shape) == 3:
        import nibabel as nib

        affine = prepared.affine if prepared.affine is not None else np.eye(4)
        data = gzip.compress(nib.Nifti1Image(result, affine).to_bytes(), compresslevel=1)
        kind, media = "nifti-gz", "application/gzip"
    else:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.round(result * 65535.0).astype(np.uint16)).save(buffer, format="PNG")
        data, kind, media = buffer.getvalue(), "png", "image/png"
    return {
        "format": kind,
        "media_type": media,
        "encoding": "base64",
        "shape": list(shape),
        "data": base64.b64encode(data).decode("ascii"),
    }


# --- helpers -----------------------------------------------------------------------------------------


def authorize(header: str | None, token_sha256: str | None) -> None:
    """Raise a 401 unless ``header`` is ``Bearer <token>`` for the token whose SHA-256 is given."""
    if token_sha256 is None:
        return
    scheme, _, token = (header or "").partition(" ")
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    # Digests of equal length compared in constant time; the scheme check does not depend on the token.
    valid = hmac.compare_digest(given, token_sha256)
    if scheme.lower() != "bearer" or not token.strip() or not valid:
        raise InputError(401, "missing or invalid token: send 'Authorization: Bearer <MEDOOD_API_TOKEN>'")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InputError(400, "invalid Content-Length header") from None
        if length > limit:
            raise InputError(413, f"body of {length} bytes exceeds the limit of {limit} bytes (max_body_mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(413, f"body exceeds the limit of {limit} bytes (max_body_mb)")
        chunks.append(chunk)
    if total == 0:
        raise InputError(400, "empty body: send the image file as the request body")
    return b"".join(chunks)


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.', '_' or '-')"
        )


def _route_path(scope: dict[str, Any]) -> str:
    path = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise InputError(405, f"method {method} not allowed here; use {allowed}")


def _parse_flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(400, f"query parameter {name}={_quote(value)} must be true or false")


def _media_type(header: str | None) -> str | None:
    if header is None:
        return None
    media = header.split(";", 1)[0].strip().lower()
    return media or None


def _quote(text: str) -> str:
    """A client-supplied string, shortened and shown with repr (no control characters)."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _error_response(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
