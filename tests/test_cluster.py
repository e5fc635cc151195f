"""Which Ray a command joins (issue 15, item 6).

A command joins the cluster named by ``--address`` or ``RAY_ADDRESS`` and otherwise starts its own
local Ray: a cluster file left by an earlier ``ray start`` (its processes gone) is never read. A named
cluster that does not answer fails at once with an error naming the address.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
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
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port
from run_folders import checkpoint_registered
from typer.testing import CliRunner

from medood.platform import jobs


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


# -- a real two-node Ray cluster on this machine (items 1 and 2) ----------------------------------

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))


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
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
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

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.head.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.head.dashboard_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def submit(self, medood_args: list[str]) -> str:
        """Submit ``medood <args>`` as a job, with the token."""
        return self.client().submit_job(
            entrypoint=" ".join([PYTHON, "-m", "medood.platform.cli", *map(shlex.quote, medood_args)]),
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
        )

    def wait(self, job: str, timeout_s: float = 300) -> tuple[str, str]:
        """Wait for ``job`` to end; (status, logs) through the job API."""
        from ray.job_submission import JobStatus

        client = self.client()
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(job)
        while status not in ended and time.monotonic() < deadline:
            time.sleep(1)
            status = client.get_job_status(job)
        if status not in ended:
            client.stop_job(job)
        return str(status), client.get_job_logs(job)

    def run_job(self, medood_args: list[str], timeout_s: float = 300) -> tuple[str, str]:
        return self.wait(self.submit(medood_args), timeout_s)

    def actors(self, class_name: str) -> list[dict]:
        """Ray's state API, through the `ray list` command with the token."""
        done = subprocess.run(
            [RAY, "list", "actors", "--address", self.dashboard, "--filter", f"class_name={class_name}",
             "--format", "json", "--limit", "100"],
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster():
    """A head (token authentication on) and a second node joined to it, 1 CPU each, on this machine."""
    token = secrets.token_hex(16)
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    nodes: list[Node] = []
    try:
        head = Node(root / "h", env, num_cpus=2)
        nodes.append(head)
        second = Node(root / "n", env, head_address=f"127.0.0.1:{head.gcs_port}", num_cpus=2)
        nodes.append(second)
        yield Cluster(head, second, token, env)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(cluster):
    """``medood data synth`` + ingest of a small embedded set, as a job on the cluster."""
    out = Path(tempfile.mkdtemp(prefix="medood-cluster-"))
    status, logs = cluster.run_job([
        "data", "synth", "digitanatomy", str(out / "raw"), "--n-train", "24", "--n-test", "12", "--size", "32",
        "--shards", str(out / "shards"), "--no-progress",
    ])
    yield {"out": out, "status": status, "logs": logs, "shards": out / "shards"}
    shutil.rmtree(out, ignore_errors=True)


TINY_AE = [
    "--set", "image_size=32", "--set", "batch_size=8", "--no-wandb", "--metric", "val_loss", "--mode", "min",
]


@pytest.mark.cluster
def test_two_live_nodes_and_ingest_through_the_job_api(cluster, shards):
    assert shards["status"] == "SUCCEEDED", shards["logs"][-3000:]
    assert (shards["shards"] / "manifest.json").is_file()
    nodes = {n["node_id"]: n for n in cluster_nodes(cluster)}
    assert len(nodes) == 2


def cluster_nodes(cluster: Cluster) -> list[dict]:
    done = subprocess.run(
        [RAY, "list", "nodes", "--address", cluster.dashboard, "--filter", "state=ALIVE", "--format", "json"],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


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


@pytest.mark.cluster
def test_train_two_workers_one_per_node(cluster, shards):
    assert shards["status"] == "SUCCEEDED", shards["logs"][-3000:]
    run = shards["out"] / "run"
    status, logs = cluster.run_job([
        "train", "--method", "autoencoder", "--data", str(shards["shards"]), "--preset", "tiny",
        *TINY_AE, "--set", "epochs=2", "--workers", "2", "--placement", "STRICT_SPREAD", "--out", str(run),
    ])
    assert status == "SUCCEEDED", logs[-3000:]
    result = json.loads((run / "run.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    workers = [a for a in cluster.actors("RayTrainWorker") if a.get("job_id") and a["state"] in ("ALIVE", "DEAD")]
    assert len({a["node_id"] for a in workers}) == 2, workers


def _trial_span(trial: Path) -> tuple[float, float]:
    """(start, end) wall time of a Tune trial from its ``result.json`` (one line per reported epoch)."""
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
    return rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]


@pytest.fixture(scope="module")
def sweep(cluster, shards):
    """``medood tune`` of a 2-setting ablation as a job: both trials at once (2 CPUs each, one per node)."""
    assert shards["status"] == "SUCCEEDED", shards["logs"][-3000:]
    out = shards["out"] / "sweep"
    status, logs = cluster.run_job([
        "tune", "--method", "autoencoder", "--data", str(shards["shards"]), "--ablation", "residual_units",
        "--preset", "tiny", "--scheduler", "fifo", "--set", "epochs=2", "--set", "image_size=32",
        "--set", "batch_size=8", "--max-concurrent", "2", "--no-wandb", "--out", str(out),
    ], timeout_s=420)
    evaluated = ("NOT RUN", "")
    if status == "SUCCEEDED":  # `medood evaluate` of the sweep's best.json, as a job too
        evaluated = cluster.run_job([
            "evaluate", str(out / "best.json"), "--data", str(shards["shards"]), "--out", str(out / "eval"),
            "--bootstrap", "50",
        ])
    return {"out": out, "status": status, "logs": logs, "evaluated": evaluated}


@pytest.mark.cluster
def test_sweep_runs_two_trials_at_once_and_evaluate_reads_its_best(cluster, shards, sweep):
    assert sweep["status"] == "SUCCEEDED", sweep["logs"][-3000:]
    out = sweep["out"]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in r for r in rows[1:]), rows
    spans = [_trial_span(t) for t in sorted(p for p in out.iterdir() if (p / "result.json").is_file())]
    assert len(spans) == 2
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, f"the two trials did not overlap: {spans}"
    assert Path(json.loads((out / "best.json").read_text())["checkpoint"]).is_dir()
    status, logs = sweep["evaluated"]
    assert status == "SUCCEEDED", logs[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["sample"]["auroc"] <= 1.0


@pytest.mark.cluster
def test_serve_deploy_on_the_cluster_answers_as_locally(cluster, shards, sweep, tmp_path):
    """`serve deploy` of a config like medood/platform/serve_config.yaml against the head, with the
    token, serving the sweep's best checkpoint; a scan gets the score `medood evaluate` gives it."""
    import yaml

    assert sweep["status"] == "SUCCEEDED", sweep["logs"][-3000:]
    api_token = secrets.token_hex(8)
    port = free_port()
    config = yaml.safe_load((REPO / "medood" / "platform" / "serve_config.yaml").read_text())
    index, model = config["applications"][0], config["applications"][1]
    index["args"]["models"] = {"digits": model["name"]}
    model["args"].update(checkpoints=[], best=[str(sweep["out"])], cpus_per_replica=0.5)
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
    try:
        deadline = time.monotonic() + 240
        ready = False
        while not ready and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as answer:
                    ready = answer.status == 200
            except urllib.error.HTTPError as error:  # 401: up, and asking for the token
                ready = error.code == 401
                time.sleep(0 if ready else 2)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        assert ready, "the deployed applications never answered"
        # A test scan and the calibrated score `medood evaluate` gave it (scores.csv).
        assert sweep["evaluated"][0] == "SUCCEEDED", sweep["evaluated"][1][-3000:]
        with open(sweep["out"] / "eval" / "scores.csv") as f:
            first = next(csv.DictReader(f))
        scan = shards["out"] / "raw" / first["id"]

        def score(headers: dict[str, str]) -> dict:
            request = urllib.request.Request(f"{url}/v1/models/digits/score", data=scan.read_bytes(),
                                             headers={"Content-Type": "image/png", **headers}, method="POST")
            for _ in range(60):  # the model's replica may still be starting behind the proxy
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        return json.loads(answer.read())
                except urllib.error.HTTPError as error:
                    if error.code not in (404, 503):
                        raise
                    time.sleep(2)
            raise AssertionError("the model never answered")

        with pytest.raises(urllib.error.HTTPError) as refused:
            score({})
        assert refused.value.code == 401
        answer = score({"Authorization": f"Bearer {api_token}"})
        assert answer["score"] == pytest.approx(float(first["score"]), abs=1e-5), (answer, first)
        assert answer["anomalous"] == (first["predicted_abnormal"] == "1")
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", cluster.dashboard], env=cluster.env,
                       capture_output=True, text=True, timeout=120)


@pytest.mark.cluster
def test_sweep_whose_driver_is_killed_resumes_without_rerunning_finished_trials(cluster, shards):
    """Stop the sweep's job (its driver killed) once one trial has finished and the next has a
    checkpoint; `medood tune --resume` as a new job keeps the finished trial and continues the other."""
    assert shards["status"] == "SUCCEEDED", shards["logs"][-3000:]
    out = shards["out"] / "sweep-resumed"
    job = cluster.submit([
        "tune", "--method", "autoencoder", "--data", str(shards["shards"]), "--ablation", "residual_units",
        "--preset", "tiny", "--scheduler", "fifo", "--set", "epochs=3", "--set", "image_size=32",
        "--set", "batch_size=8", "--max-concurrent", "1", "--no-wandb", "--out", str(out),
    ])

    def trials() -> list[Path]:
        return sorted(p for p in out.iterdir() if (p / "run").is_dir()) if out.is_dir() else []

    def finished(trial: Path) -> bool:
        return (trial / "run" / "run.json").is_file()

    deadline = time.monotonic() + 360
    while time.monotonic() < deadline:
        done = [t for t in trials() if finished(t)]
        going = [t for t in trials() if not finished(t) and checkpoint_registered(t / "run")]
        if len(done) == 1 and going:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no finished + checkpointed pair of trials before the deadline: {trials()}")
    cluster.client().stop_job(job)
    status, _ = cluster.wait(job, timeout_s=120)
    assert status == "STOPPED"
    (done,) = done
    done_files = {p: p.stat().st_mtime_ns for p in (done / "run").rglob("*") if p.is_file()}

    status, logs = cluster.run_job(["tune", "--resume", "--out", str(out)], timeout_s=420)
    assert status == "SUCCEEDED", logs[-3000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in r for r in rows[1:]), rows
    assert {p: p.stat().st_mtime_ns for p in (done / "run").rglob("*") if p.is_file()} == done_files
    (resumed,) = [t for t in trials() if t != done]
    history = json.loads((resumed / "run" / "run.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert max(h["resumed_from_epoch"] for h in history) >= 1  # it went on from its own checkpoint


@pytest.mark.cluster
def test_node_lost_mid_training_resumes_from_its_checkpoint(cluster, shards):
    """Kill the second node's raylet (a crash) once the run has a checkpoint: Ray Train restarts the
    workers on what is left (SPREAD: both fit the head) from the latest checkpoint and finishes. Last
    test of the module: the cluster has one node afterwards."""
    assert shards["status"] == "SUCCEEDED", shards["logs"][-3000:]
    run = shards["out"] / "run-node-loss"
    # Epochs long enough (64 px, 6 of them) that the kill lands while the run still trains: at 32 px an
    # epoch takes under a second and the run could end before the node is gone (nothing left to resume).
    epochs = 6
    job = cluster.submit([
        "train", "--method", "autoencoder", "--data", str(shards["shards"]), "--preset", "tiny", *TINY_AE,
        "--set", "image_size=64", "--set", f"epochs={epochs}", "--workers", "2", "--cpus-per-worker", "0.5",
        "--placement", "SPREAD", "--max-failures", "2", "--out", str(run),
    ])
    deadline = time.monotonic() + 240
    while not checkpoint_registered(run) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert checkpoint_registered(run), "no checkpoint before the deadline"
    workers = [a for a in cluster.actors("RayTrainWorker") if a["state"] == "ALIVE" and a.get("job_id")]
    second_id = next(n["node_id"] for n in cluster_nodes(cluster) if n["node_ip"] and n["node_id"] and not n.get("is_head_node"))
    assert second_id in {a["node_id"] for a in workers}, "no worker on the second node"
    (raylet,) = cluster.second.processes("/raylet ")
    assert not (run / "run.json").exists(), "the run ended before the node could be killed"
    killed_at = time.monotonic()
    os.kill(raylet, signal.SIGKILL)
    status, logs = cluster.wait(job, timeout_s=400)
    recovery_s = time.monotonic() - killed_at
    assert status == "SUCCEEDED", logs[-3000:]
    result = json.loads((run / "run.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    resumed = [h["resumed_from_epoch"] for h in history]
    restored = resumed[-1]  # the later epochs ran after a restore from a registered checkpoint
    assert 1 <= restored < epochs and resumed[0] == 0 and resumed == sorted(resumed), resumed
    assert all(r < h["epoch"] for r, h in zip(resumed, history)), resumed  # each restore is from an earlier epoch
    print(f"node loss: resumed from epoch {restored}, {recovery_s:.0f} s from the kill to the end")


def test_runtime_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch):
    # What `ray job submit --runtime-env-json '{"env_vars": {"WANDB_MODE": "disabled"}}'` gives its driver.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"WANDB_MODE": "disabled"}}}))
    assert "WANDB_MODE" not in jobs.runtime_env()["env_vars"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert "WANDB_MODE" in jobs.runtime_env()["env_vars"]
