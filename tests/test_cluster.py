"""Which Ray a command joins (issue 15, item 6).

A command joins the cluster named by ``--address`` or ``RAY_ADDRESS`` and otherwise starts its own
local Ray: a cluster file left by an earlier ``ray start`` (its processes gone) is never read. A named
cluster that does not answer fails at once with an error naming the address.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import free_port
from run_folders import latest_checkpoint_epoch
from s3_server import BUCKET, SECRET_KEY, bucket_files, object_versions, read_object, secret_free
from typer.testing import CliRunner

from medood.platform import checkpoint as ckpt
from medood.platform import jobs, storage
from medood.platform.cli import app
from medood.platform.tune import RESULTS_CSV


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
    stale = f"127.0.0.1:{free_port()}"
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
    address = f"127.0.0.1:{free_port()}"
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
    address = f"127.0.0.1:{free_port()}"
    # evaluate joins Ray before it reads anything.
    monkeypatch.setattr(
        "sys.argv", ["medood", "evaluate", str(tmp_path / "run"), "--data", str(tmp_path), "--address", address]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert address in capsys.readouterr().err.replace("\n", "")


def test_runtime_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch):
    # What `ray job submit --runtime-env-json '{"env_vars": {"WANDB_MODE": "disabled"}}'` gives its driver.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"WANDB_MODE": "disabled"}}}))
    assert "WANDB_MODE" not in jobs.runtime_env()["env_vars"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert "WANDB_MODE" in jobs.runtime_env()["env_vars"]


# -- a real two-node Ray cluster on this machine, with its storage on S3 (items 1, 2, 3 and 5) ------

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
S3 = f"s3://{BUCKET}/cluster"  # shards, the Train run, the sweep, its evaluation and what serving loads


class Node:
    """One `ray start` node with its own ports and temp folder; stopped by its own processes."""

    def __init__(self, root: Path, env: dict[str, str], *, head_address: str | None = None, num_cpus: int = 1) -> None:
        self.temp_dir = root
        self.ports = {name: free_port() for name in (
            "node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port", "metrics-export-port",
        )}
        low = _free_port_range(20)
        args = [RAY, "start", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                "--temp-dir", str(root), "--min-worker-port", str(low), "--max-worker-port", str(low + 19)]
        args += [f"--{name}={port}" for name, port in self.ports.items()]
        if head_address is None:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            args += ["--address", head_address]
        # The node's processes (and so the jobs' drivers and workers) start in its own folder: a URI taken
        # for a local path by mistake would show there as a folder named "s3:".
        self.cwd = root.with_name(root.name + "-cwd")
        self.cwd.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(args, env=env, cwd=self.cwd, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def processes(self, name: str = "") -> list[int]:
        """PIDs of this node's processes (their command lines name its node manager port or temp folder)."""
        marks = (f"--node_manager_port={self.ports['node-manager-port']}", str(self.temp_dir))
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(mark in cmd for mark in marks) and name in cmd and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """SIGTERM this node's processes, SIGKILL what is left after 10 s (never `ray stop`)."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)
        for pid in self.processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _free_port_range(n: int) -> int:
    while True:
        low = free_port()
        if low + n < 65000 and all(_port_free(low + i) for i in range(n)):
            return low


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Cluster:
    head: Node
    second: Node
    token: str
    env: dict[str, str]
    root: Path
    jobs: list[str] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.head.dashboard_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def submit(self, medood_args: list[str]) -> str:
        """Submit ``medood <args>`` as a job, with the token. The job's runtime env holds no credentials:
        the AWS variables come from the environment each node was started in."""
        job = self.client().submit_job(
            entrypoint=" ".join([PYTHON, "-m", "medood.platform.cli", *map(shlex.quote, medood_args)]),
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
        )
        self.jobs.append(job)
        return job

    def wait(self, job: str, timeout_s: float = 300) -> tuple[str, str]:
        """Wait for ``job`` to end; (status, logs) through the job API."""
        from ray.job_submission import JobStatus

        client = self.client()
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(job)
        while status not in ended and time.monotonic() < deadline:
            time.sleep(0.5)
            status = client.get_job_status(job)
        if status not in ended:
            client.stop_job(job)
        return str(status), client.get_job_logs(job)

    def run_job(self, medood_args: list[str], timeout_s: float = 300) -> tuple[str, str]:
        return self.wait(self.submit(medood_args), timeout_s)

    def state(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API (``ray list actors|nodes``), through the `ray` command with the token."""
        args = [RAY, "list", kind, "--address", self.dashboard, "--format", "json", "--limit", "100"]
        for condition in filters:
            args += ["--filter", condition]
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (token authentication on) and a second node joined to it, 2 CPUs each, on this machine.
    Both start in an environment holding the AWS variables of ``s3_server``, as every node of a real
    cluster must (README, "Object storage")."""
    token = secrets.token_hex(16)
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    assert env["AWS_ENDPOINT_URL"] == s3_server["endpoint"]
    nodes: list[Node] = []
    try:
        head = Node(root / "h", env, num_cpus=2)
        nodes.append(head)
        second = Node(root / "n", env, head_address=f"127.0.0.1:{head.gcs_port}", num_cpus=2)
        nodes.append(second)
        yield Cluster(head, second, token, env, root)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_out():
    """The test's local files: the raw scans (a scan is posted to the served model)."""
    out = Path(tempfile.mkdtemp(prefix="medood-cluster-"))
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(cluster, local_out):
    """``medood data synth`` + ingest of a small embedded set into ``s3://`` shards, as a job."""
    status, logs = cluster.run_job([
        "data", "synth", "digitanatomy", str(local_out / "raw"), "--n-train", "24", "--n-test", "12", "--size", "32",
        "--shards", f"{S3}/shards", "--no-progress",
    ])
    assert status == "SUCCEEDED", logs[-3000:]
    return f"{S3}/shards"


def read_json(uri: str) -> dict:
    return json.loads(storage.location(uri).read_text())


@pytest.mark.cluster
def test_two_live_nodes_and_ingest_to_object_storage_through_the_job_api(cluster, shards, s3_server):
    assert len(cluster.state("nodes", "state=ALIVE")) == 2
    files = bucket_files(s3_server["endpoint"], "cluster/shards")  # listed by pyarrow, not by medood
    assert "manifest.json" in files and "part-00000.parquet" in files, sorted(files)
    assert not any(name.startswith(".") for name in files)  # no temporary shard left behind
    info = CliRunner().invoke(app, ["data", "info", shards, "--json"], catch_exceptions=False)
    assert info.exit_code == 0, info.output
    info = json.loads(info.output)  # the manifest, and every listed shard found
    assert info["path"] == shards and info["rows"] == 36 and info["missing_shards"] == []


@pytest.mark.cluster
def test_a_job_without_the_token_is_refused(cluster):
    request = urllib.request.Request(
        f"{cluster.dashboard}/api/jobs/", data=json.dumps({"entrypoint": "echo hi"}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code in (401, 403)
    wrong = urllib.request.Request(request.full_url, data=request.data, method="POST",
                                   headers={"Content-Type": "application/json", "Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code in (401, 403)


def _trial_span(result_json: bytes) -> tuple[float, float]:
    """(start, end) wall time of a Tune trial from its ``result.json`` (one line per reported epoch)."""
    rows = [json.loads(line) for line in result_json.decode().splitlines() if line.strip()]
    return rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]


SWEEP_EPOCHS = 3


@pytest.fixture(scope="module")
def sweep(cluster, shards, s3_server):
    """``medood tune`` of a 3-setting ablation on S3 as a job, two trials at once (2 CPUs each, one per
    node). Its driver is killed (`ray job stop`: SIGTERM, then SIGKILL; it writes nothing) once a trial
    has finished and another has a registered checkpoint; ``medood tune --resume`` as a new job
    finishes the sweep, then ``medood evaluate`` of its ``best.json`` (with a MOOD submission)."""
    out, prefix = f"{S3}/sweep", "cluster/sweep"
    job = cluster.submit([
        "tune", "--method", "autoencoder", "--data", shards, "--ablation", "anomaly_measure",
        "--preset", "tiny", "--scheduler", "fifo", "--set", f"epochs={SWEEP_EPOCHS}", "--set", "image_size=32",
        "--set", "batch_size=8", "--max-concurrent", "2", "--no-wandb", "--out", out,
    ])

    def state() -> tuple[dict, list[str], list[str]]:
        files = object_versions(s3_server["endpoint"], prefix)
        trials = sorted({name.split("/")[0] for name in files if name.split("/")[1:2] == ["run"]})
        done = [t for t in trials if f"{t}/run/{ckpt.RUN_FILE}" in files]
        going = {t: latest_checkpoint_epoch(storage.location(f"{out}/{t}/run")) for t in trials if t not in done}
        return files, done, [t for t, epoch in going.items() if epoch]

    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        files, done, going = state()
        # a trial checkpointed at its first epoch has two more to go: the kill lands while it trains
        if done and any(latest_checkpoint_epoch(storage.location(f"{out}/{t}/run")) == 1 for t in going):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no finished + checkpointed pair of trials before the deadline: {state()}")
    cluster.client().stop_job(job)
    stopped, _ = cluster.wait(job, timeout_s=120)
    files, done, going = state()  # what the last moments of the killed driver left
    results_after_kill = storage.location(f"{out}/{RESULTS_CSV}").exists()
    done_files = {name: files[name] for name in files if name.split("/")[0] in done and name.split("/")[1:2] == ["run"]}
    resumed = cluster.run_job(["tune", "--resume", "--out", out], timeout_s=420)
    assert resumed[0] == "SUCCEEDED", resumed[1][-3000:]
    evaluated = cluster.run_job([
        "evaluate", f"{out}/best.json", "--data", shards, "--out", f"{out}/eval", "--mood", f"{out}/mood",
        "--bootstrap", "20",
    ])
    return {
        "out": out, "prefix": prefix, "stopped": stopped, "done": done, "going": [t for t in going if t not in done],
        "done_files": done_files, "results_after_kill": results_after_kill, "resumed": resumed,
        "evaluated": evaluated,
    }


@pytest.mark.cluster
def test_sweep_on_object_storage_runs_two_trials_at_once_and_evaluate_reads_its_best(cluster, sweep, s3_server):
    from medood.platform.serve import ServeOptions, resolve_models

    out = sweep["out"]
    rows = storage.location(f"{out}/{RESULTS_CSV}").read_text().splitlines()
    assert len(rows) == 4 and all(",complete," in r for r in rows[1:]), rows
    files = bucket_files(s3_server["endpoint"], sweep["prefix"])
    results = sorted(name for name in files if name.count("/") == 1 and name.endswith("/result.json"))
    spans = [_trial_span(read_object(s3_server["endpoint"], f"{sweep['prefix']}/{name}")) for name in results]
    assert len(spans) == 3, sorted(files)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two trials ran at the same time: {spans}"
    best = read_json(f"{out}/{ckpt.BEST_FILE}")
    assert best["method"] == "autoencoder" and best["config"]["epochs"] == SWEEP_EPOCHS
    assert best["checkpoint"].startswith(f"{out}/") and storage.location(best["checkpoint"]).is_dir()
    model = ckpt.load(f"{out}/{ckpt.BEST_FILE}")
    assert model.name == "autoencoder" and model.method.config.score == best["config"]["score"]
    plots = [n for n in files if n.startswith("plots/") and n.endswith((f"{best['metric']}_by_setting.png", "/curves.png"))]
    assert len(plots) == 2, sorted(files)
    for name in plots:
        assert read_object(s3_server["endpoint"], f"{sweep['prefix']}/{name}")[:4] == b"\x89PNG"

    status, logs = sweep["evaluated"]
    assert status == "SUCCEEDED", logs[-3000:]
    for name in ("report.md", "metrics.json", "scores.csv", "roc.png"):
        assert f"eval/{name}" in files, sorted(files)
    assert any(n.startswith("mood/sample/") for n in files) and any(n.startswith("mood/pixel/") for n in files)
    metrics = read_json(f"{out}/eval/metrics.json")
    assert metrics["checkpoint"] == best["checkpoint"] + "/model.pt"  # the checkpoint best.json names
    assert metrics["n_samples"] > 0 and 0.0 <= metrics["sample"]["auroc"] <= 1.0
    # what serving loads for `--best s3://.../sweep`
    entries = resolve_models(ServeOptions.from_args({"best": [out], "gpus_per_replica": 0}))
    assert [e.path for e in entries] == [best["checkpoint"] + "/model.pt"]
    assert entries[0].info["method"] == "autoencoder"


@pytest.mark.cluster
def test_sweep_whose_driver_is_killed_resumes_without_rerunning_finished_trials(sweep, s3_server):
    """The killed driver wrote nothing; `medood tune --resume` kept each trial finished before the kill
    as it was and continued each checkpointed one from its own latest checkpoint."""
    assert sweep["stopped"] == "STOPPED"
    assert not sweep["results_after_kill"]
    status, logs = sweep["resumed"]
    assert "Ablation `anomaly_measure`" in logs
    # One line per trial epoch, no Tune status box or table.
    assert "Configuration for experiment" not in logs and "Trial status" not in logs
    assert sweep["done"] and sweep["going"], sweep
    # The finished trials were not run again: not one of their files changed.
    now = object_versions(s3_server["endpoint"], sweep["prefix"])
    assert {name: now.get(name) for name in sweep["done_files"]} == sweep["done_files"]
    # A trial cut short went on from its own latest registered checkpoint (the same run folder, as
    # `medood train` into an existing --out does) instead of starting over: every epoch once.
    for trial in sweep["going"]:
        run = f"{sweep['out']}/{trial}/run"
        history = read_json(f"{run}/{ckpt.RUN_FILE}")["history"]
        assert [h["epoch"] for h in history] == list(range(1, SWEEP_EPOCHS + 1))
        resumed_from = [h["resumed_from_epoch"] for h in history]
        restored = resumed_from[-1]
        assert 1 <= restored < SWEEP_EPOCHS, resumed_from
        assert resumed_from == [0] * restored + [restored] * (SWEEP_EPOCHS - restored), resumed_from
        checkpoints = [n for n in now if n.startswith(f"{trial}/run/checkpoint_") and n.endswith("/model.pt")]
        epochs = {ckpt.read_payload(f"{sweep['out']}/{n}")["metrics"]["epoch"] for n in checkpoints}
        assert SWEEP_EPOCHS in epochs, epochs


@pytest.mark.cluster
def test_serve_deploy_on_the_cluster_answers_as_locally(cluster, sweep, local_out, tmp_path):

    """`serve deploy` of a config like medood/platform/serve_config.yaml against the head, with the
    token, serving the sweep's best checkpoint from S3; a scan gets the score `medood evaluate` gave it."""
    import yaml

    assert sweep["evaluated"][0] == "SUCCEEDED", sweep["evaluated"][1][-3000:]
    api_token = secrets.token_hex(8)
    port = free_port()
    config = yaml.safe_load((REPO / "medood" / "platform" / "serve_config.yaml").read_text())
    index, model = config["applications"][0], config["applications"][1]
    index["args"]["models"] = {"digits": model["name"]}
    model["args"].update(checkpoints=[], best=[sweep["out"]], cpus_per_replica=0.5)
    # Both nodes share this machine's ports: one proxy, on the head.
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port},
                  applications=[
                      {**app, "runtime_env": {"env_vars": {"MEDOOD_API_TOKEN": api_token}}} for app in (index, model)
                  ])
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    done = subprocess.run([serve_cli, "deploy", str(path), "--address", cluster.dashboard], env=cluster.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    # A test scan and the calibrated score `medood evaluate` gave it (scores.csv, on S3).
    first = next(csv.DictReader(io.StringIO(storage.location(f"{sweep['out']}/eval/scores.csv").read_text())))
    scan = local_out / "raw" / first["id"]
    try:

        def score(headers: dict[str, str]) -> dict:
            request = urllib.request.Request(f"{url}/v1/models/digits/score", data=scan.read_bytes(),
                                             headers={"Content-Type": "image/png", **headers}, method="POST")
            deadline = time.monotonic() + 240  # the proxy and the model's replica may still be starting
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        return json.loads(answer.read())
                except urllib.error.HTTPError as error:
                    if error.code not in (404, 503) or time.monotonic() > deadline:
                        raise
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                time.sleep(1)

        answer = score({"Authorization": f"Bearer {api_token}"})
        assert answer["score"] == pytest.approx(float(first["score"]), abs=1e-5), (answer, first)
        assert answer["anomalous"] == (first["predicted_abnormal"] == "1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            score({})
        assert refused.value.code == 401
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", cluster.dashboard], env=cluster.env,
                       capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def node_loss(cluster, shards):
    """One 2-worker `medood train` job with ``--data`` and ``--out`` on S3 (Ray Train's storage_path):
    as soon as it has a registered checkpoint, the second node crashes (its raylet and every process it
    started killed at once). Ray Train restarts the workers on what is left (SPREAD: both fit the head)
    from the latest checkpoint, read back from S3. The cluster has one node afterwards: the module's
    last tests use this."""
    run = f"{S3}/run"
    (second_id,) = [n["node_id"] for n in cluster.state("nodes", "state=ALIVE") if not n.get("is_head_node")]
    # Epochs long enough (64 px, 6 of them) that the kill lands while the run still trains: at 32 px an
    # epoch takes under a second and the run could end before the node is gone (nothing left to resume).
    epochs = 6
    job = cluster.submit([
        "train", "--method", "autoencoder", "--data", shards, "--preset", "tiny", "--set", "image_size=64",
        "--set", "batch_size=8", "--set", f"epochs={epochs}", "--no-wandb", "--metric", "val_loss", "--mode", "min",
        "--workers", "2", "--cpus-per-worker", "0.5", "--placement", "SPREAD", "--max-failures", "2", "--out", run,
    ])
    deadline = time.monotonic() + 240
    while (checkpointed := latest_checkpoint_epoch(storage.location(run))) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpointed is not None, "no checkpoint before the deadline"
    ended_before_kill = storage.location(f"{run}/{ckpt.RUN_FILE}").exists()
    # The raylet is the matching process whose parent is not one: a worker it is forking has its command
    # line until the exec, so a second match can show up for a moment.
    found = cluster.second.processes("/raylet ")
    (raylet,) = [pid for pid in found if _parent(pid) not in found]
    crashed = {*cluster.second.processes(), *_descendants(raylet)} - {raylet}  # with the workers it started
    killed_at = time.monotonic()
    # A crash: every process of the node at once (a raylet killed alone leaves its workers training on
    # for a while, until they notice).
    for pid in [raylet, *crashed]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    status, logs = cluster.wait(job, timeout_s=400)
    kill_to_end_s = time.monotonic() - killed_at
    ray_job_id = cluster.client().get_job_info(job).job_id
    workers = [a for a in cluster.state("actors", "class_name=RayTrainWorker") if a.get("job_id") == ray_job_id]
    return {
        "run": run, "epochs": epochs, "status": status, "logs": logs, "workers": workers, "second_id": second_id,
        "ended_before_kill": ended_before_kill, "checkpointed_at_kill": checkpointed,
        "reported": _reported_epochs(logs, epochs), "kill_to_end_s": kill_to_end_s,
    }


def _parent(pid: int) -> int | None:
    """The parent PID of ``pid``, None when it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, and by those, ... (Ray workers rename their command lines)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            if (parent := _parent(int(entry.name))) is not None:
                parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _reported_epochs(logs: str, epochs: int) -> list[int]:
    """The epochs a run reported, in order, from its progress lines (``epoch 3/6  train ...``)."""
    return [int(m) for m in re.findall(rf"\bepoch (\d+)/{epochs}\b", logs)]


@pytest.mark.cluster
def test_train_two_workers_one_per_node_on_object_storage(node_loss, s3_server):
    # Two Train workers, one on each node: the second node only ever held one of them (the two of the
    # restart after the crash both went to the head).
    nodes = [a["node_id"] for a in node_loss["workers"]]
    assert nodes.count(node_loss["second_id"]) == 1 and len(nodes) >= 4, node_loss["workers"]
    assert node_loss["status"] == "SUCCEEDED", node_loss["logs"][-3000:]
    result = read_json(f"{node_loss['run']}/{ckpt.RUN_FILE}")
    assert result["data"] == f"{S3}/shards"
    assert result["checkpoint"].startswith(f"{S3}/run/checkpoint_")
    files = bucket_files(s3_server["endpoint"], "cluster/run")
    assert result["checkpoint"].removeprefix(f"{S3}/run/") + "/model.pt" in files, sorted(files)
    # a run folder on S3 resolves to its best checkpoint, as a local one does
    assert ckpt.resolve(node_loss["run"]) == result["checkpoint"] + "/model.pt"


@pytest.mark.cluster
def test_node_lost_mid_training_resumes_from_its_checkpoint(node_loss):
    assert not node_loss["ended_before_kill"], "the run ended before the node could be killed"
    assert node_loss["status"] == "SUCCEEDED", node_loss["logs"][-3000:]
    epochs = node_loss["epochs"]
    history = read_json(f"{node_loss['run']}/{ckpt.RUN_FILE}")["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    resumed = [h["resumed_from_epoch"] for h in history]
    restored = resumed[-1]  # the later epochs ran after a restore from a registered checkpoint
    assert 1 <= restored < epochs and resumed[0] == 0 and resumed == sorted(resumed), resumed
    assert all(r < h["epoch"] for r, h in zip(resumed, history)), resumed  # each restore is from an earlier epoch
    reported = node_loss["reported"]  # every epoch reported, the ones trained again after the restore too
    assert reported[-1] == epochs and set(reported) == set(range(1, epochs + 1)), reported
    # What the crash cost: epochs trained twice, and the wall time from the kill to the end beyond the
    # epochs that were left to train (each epoch's own time, from the progress lines).
    after = sum(t for e, t in dict(_epoch_times(node_loss["logs"], epochs)).items() if e > restored)  # last runs
    print(
        f"node loss: killed with epoch {node_loss['checkpointed_at_kill']} the latest registered checkpoint; "
        f"restored from epoch {restored}; epochs reported {reported} ({len(reported) - epochs} trained twice); "
        f"{node_loss['kill_to_end_s']:.0f} s from the kill to the end, {after:.0f} s of it training epochs "
        f"{restored + 1}-{epochs}"
    )


def _epoch_times(logs: str, epochs: int) -> list[tuple[int, float]]:
    """(epoch, seconds) from the progress lines (``epoch 3/6  train ... 4.1 s/epoch ...``)."""
    return [(int(e), float(t)) for e, t in re.findall(rf"\bepoch (\d+)/{epochs}\b.*?([\d.]+) s/epoch", logs)]


@pytest.mark.cluster
def test_credentials_appear_in_no_job_log_object_or_node_file(cluster, node_loss, local_out, s3_server):
    """Last: after every job of the module. The secret key is in no job's logs or metadata, in no object
    of the bucket, in no file of either node (Ray's session logs) or of the test, and in nothing medood
    hands to Ray; no URI was taken for a local folder."""
    from medood.platform.jobs import runtime_env

    client = cluster.client()
    assert len(cluster.jobs) >= 5
    for job in cluster.jobs:
        assert SECRET_KEY not in client.get_job_logs(job), job
    assert SECRET_KEY not in json.dumps([job.__dict__ for job in client.list_jobs()], default=str)
    secret = SECRET_KEY.encode()
    objects = bucket_files(s3_server["endpoint"])
    assert any(name.startswith("cluster/run/") for name in objects)
    for name in objects:
        assert secret not in read_object(s3_server["endpoint"], name), name
    # What Ray ships to Train workers and read tasks: credentials come from each process's environment.
    assert secret not in pickle.dumps(storage.location(S3).filesystem)
    assert SECRET_KEY not in json.dumps(runtime_env())
    assert secret_free([cluster.root, local_out]) > 100
    assert not [p for p in (*cluster.root.rglob("s3:*"), *local_out.rglob("s3:*"), *REPO.glob("s3:*"))]
