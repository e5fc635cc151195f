"""Which Ray a command joins (issue 15, item 6).

A command joins the cluster named by ``--address`` or ``RAY_ADDRESS`` and otherwise starts its own
local Ray: a cluster file left by an earlier ``ray start`` (its processes gone) is never read. A named
cluster that does not answer fails at once with an error naming the address.
"""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from medood.platform import jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_ray_init(monkeypatch):
    """Record what ``ensure_ray`` passes to ``ray.init`` instead of starting Ray."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(jobs, "quiet_ray_data", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_no_address_starts_a_local_ray_even_with_a_stale_cluster_file(fake_ray_init, monkeypatch, tmp_path):
    import ray._common.utils as ray_utils

    # What an earlier `ray start` leaves behind (its processes gone), in this test's own Ray temp dir.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    stale = f"127.0.0.1:{_free_port()}"
    (tmp_path / "ray").mkdir()
    address_file = ray_utils.get_ray_address_file(None)
    assert address_file.startswith(str(tmp_path))
    with open(address_file, "w") as f:
        f.write(stale)
    jobs.ensure_ray(num_cpus=1)
    (kwargs,) = fake_ray_init
    # "local" is the one address for which Ray does not read the cluster file (None and "auto" do).
    assert kwargs["address"] == "local"
    assert kwargs["num_cpus"] == 1


def test_ray_address_and_option_name_the_cluster(fake_ray_init, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        jobs.ensure_ray()
        jobs.use_address(f"ray://{address}")  # --address wins over RAY_ADDRESS
        jobs.ensure_ray()
    assert [c["address"] for c in fake_ray_init] == [address, f"ray://{address}"]
    # Joining a cluster passes no local-start arguments (Ray refuses num_cpus for an existing cluster).
    assert all("num_cpus" not in c and "include_dashboard" not in c for c in fake_ray_init)


def test_unreachable_cluster_is_a_clear_error_naming_the_address(fake_ray_init):
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match=address):
        jobs.ensure_ray(address)
    assert fake_ray_init == []  # failed before Ray's minutes of retries


@pytest.mark.parametrize("command", ["train", "evaluate", "tune", "serve", "demo"])
def test_commands_that_start_ray_take_address(command):
    from medood.platform import cli

    cli._register_sweep_and_serve_commands()
    result = CliRunner().invoke(cli.app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--address" in result.output


def test_cli_unreachable_address_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    from medood.platform import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_free_port()}"
    # evaluate joins Ray before it reads anything.
    monkeypatch.setattr(
        "sys.argv", ["medood", "evaluate", str(tmp_path / "run"), "--data", str(tmp_path), "--address", address]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert address in capsys.readouterr().err.replace("\n", "")
