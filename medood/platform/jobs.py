"""Connecting to Ray: a local Ray on a laptop, the cluster under `ray job submit`, and the runtime env.

Which Ray a command joins is explicit (``resolve_address``): the cluster named by ``--address``
(``use_address`` puts it into ``RAY_ADDRESS``), else the one named by ``RAY_ADDRESS`` (what
`ray job submit` sets for the job's driver), else a fresh local Ray sized to this machine
(``address="local"``: a cluster file left in /tmp/ray by an earlier `ray start` is never read).
A named cluster that does not answer fails at once with an error that names the address
(``ClusterUnreachable``) instead of Ray's minutes of retries.
``submit_command`` builds the `ray job submit` line for a medood command, with the token
authentication Ray 2.60 turns on for the dashboard (``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
from typing import Any

ADDRESS_HELP = (
    "Ray cluster to join (host:port of its GCS, ray://host:port, or auto); default: $RAY_ADDRESS, "
    "else a new local Ray."
)


#: Ray Train settings for a local (one-node) Ray, set in the driver's environment unless the user set them
#: (Ray Train passes these variables on from the driver to its controller and workers):
#: - no preemption watcher: it watches for nodes being drained (spot instances), which a local Ray has
#:   none of, and costs an actor process (seconds of CPU on a small machine) per run;
#: - the controller polls its workers every 0.5 s instead of 2 s, so a run ends (and its epoch lines
#:   show) up to 1.5 s sooner; a poll is one small actor call.
LOCAL_TRAIN_SETTINGS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class ClusterUnreachable(ConnectionError):
    """The Ray cluster named by --address / RAY_ADDRESS does not answer."""


def use_address(address: str | None) -> None:
    """Make ``address`` (a command's --address) the cluster every later ``ensure_ray`` joins."""
    if address:
        os.environ["RAY_ADDRESS"] = address


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``RAY_ADDRESS``, else ``"local"`` (a new local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ``ClusterUnreachable`` naming ``address`` when nothing listens at its host:port.

    Ray itself retries an unreachable GCS for minutes; a TCP connect answers in milliseconds.
    ``auto`` and ``local`` are left to Ray.
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"Ray address {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address!r} ({error.strerror or error}); check --address / "
            "RAY_ADDRESS (the head's GCS address, as `ray start --head` printed it)"
        ) from None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Initialise Ray once per process and return its cluster resources.

    Joins ``address``, else ``RAY_ADDRESS``; without either it always starts a new local Ray
    (``address="local"``), so a Ray started by hand on the same machine, or the stale cluster file
    one leaves behind, is never joined by accident. ``quiet`` keeps Ray's
    own INFO / WARNING lines out of the terminal (they stay in Ray's log folder, /tmp/ray/session_*):
    the driver logs at ERROR, worker output is not forwarded, and the raylet's "N worker processes
    started" warning (Ray counts its own short-lived Ray Data and Train workers) is not raised on
    small machines.
    """
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        address = resolve_address(address)
        kwargs["address"] = address
        if address == "local":
            kwargs["num_cpus"] = num_cpus or os.cpu_count()
            kwargs["include_dashboard"] = False
            if quiet:
                # Read by the raylet this call starts (a RAY_<config> environment override).
                startup = max(16, 4 * int(kwargs["num_cpus"]))
                os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(startup))
            for key, value in LOCAL_TRAIN_SETTINGS.items():
                os.environ.setdefault(key, value)
        else:
            check_reachable(address)
        if quiet:
            kwargs["logging_level"] = logging.ERROR
        kwargs["runtime_env"] = runtime_env()
        try:
            ray.init(**kwargs)
        except ConnectionError as error:
            raise ClusterUnreachable(
                f"cannot reach the Ray cluster at {address!r} ({error}); check RAY_ADDRESS / --address, and with "
                "token authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
            ) from None
    quiet_ray_data()
    return ray.cluster_resources()


def quiet_ray_data() -> None:
    """No per-operator progress bars or execution banners from Ray Data (medood shows its own progress)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # "Dataset ... execution finished" (INFO) and "Progress bars disabled" (WARNING) on every pass.
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def runtime_env() -> dict[str, Any]:
    """Environment for every Ray worker: W&B offline unless the user chose, no Ray Data progress spam.

    Inside a `ray job submit` job, variables the job's own runtime env sets are left to it (Ray refuses
    a driver runtime env that sets the same variable again).
    """
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    for key in ("WANDB_API_KEY", "WANDB_DIR", "MEDOOD_SALT"):
        if key in os.environ:
            env[key] = os.environ[key]
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return {"env_vars": env}


def submit_command(medood_args: list[str], *, address: str = "http://127.0.0.1:8265", working_dir: str = ".") -> str:
    """The `ray job submit` command line that runs ``medood <args>`` on a cluster."""
    args = " ".join(shlex.quote(a) for a in medood_args)
    return (
        f"RAY_AUTH_MODE=token ray job submit --address {shlex.quote(address)} "
        f"--working-dir {shlex.quote(working_dir)} -- medood {args}"
    )
