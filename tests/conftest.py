"""Shared test settings: no network tracking, and a private medood home (salt) per test session."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MEDOOD_HOME", tempfile.mkdtemp(prefix="medood-home-"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _ray_address_stays_the_tests_own():
    """A command's ``--address`` is stored in ``RAY_ADDRESS`` (``jobs.use_address``); a test that runs one
    in-process must not leave it behind for the next test's local Ray."""
    before = os.environ.get("RAY_ADDRESS")
    yield
    if before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = before


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server (``tests/s3_server.py``) for the module, with the standard AWS variables
    pointing at it while the module runs: a Ray started afterwards passes them to its workers."""
    from s3_server import AWS_UNSET, aws_env, seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server, pytest.MonkeyPatch.context() as env:
        for key in AWS_UNSET:
            env.delenv(key, raising=False)
        for key, value in aws_env(server["endpoint"]).items():
            env.setenv(key, value)
        yield server
