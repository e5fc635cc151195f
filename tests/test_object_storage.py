"""Storage locations (``medood.platform.storage``): local paths, ``s3://`` URIs, refused schemes.

The commands on object storage (ingest, a two-worker Train run, a sweep, evaluate of its ``best.json``,
serving) run against a real S3 server (SeaweedFS, ``tests/s3_server.py``) on the two-node cluster of
``tests/test_cluster.py``, which also checks that the secret key appears in no output, object or log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY


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


def test_local_paths_stay_local_paths(tmp_path, monkeypatch):
    from medood.platform import storage

    # With no region set, pyarrow asks AWS for the bucket's region (a network call, seconds to fail here).
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    where = storage.location(tmp_path / "a" / ".." / "b")
    assert where.is_local and where.uri == str(tmp_path / "b") and where.ray_filesystem is None
    (where / "x.json").write_text("{}")
    assert where.listdir("*.json") == ["x.json"] and (where / "x.json").read_text() == "{}"
    assert not list(where.local_path().glob(".*.tmp"))  # written under a temporary name, then renamed
    assert storage.location(f"s3://{BUCKET}/runs/ae/").uri == f"s3://{BUCKET}/runs/ae"
    assert storage.location(f"s3://{BUCKET}/runs/ae").parent.uri == f"s3://{BUCKET}/runs"
