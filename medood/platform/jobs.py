"""Connecting to Ray: a local Ray on a laptop, the cluster under `ray job submit`, and the runtime env.

``ensure_ray()`` joins the cluster named by ``RAY_ADDRESS`` (what `ray job submit` sets for the
job's driver) or by ``address``; without either it starts a local Ray sized to this machine.
``submit_command`` builds the `ray job submit` line for a medood command, with the token
authentication Ray 2.60 turns on for the dashboard (``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import logging
import os
import shlex
from typing import Any


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Initialise Ray once per process and return its cluster resources.

    Without ``address`` or ``RAY_ADDRESS`` it always starts a new local Ray (``address="local"``), so
    a Ray started by hand on the same machine is never joined by accident. ``quiet`` keeps Ray's
    own INFO / WARNING lines out of the terminal (they stay in Ray's log folder, /tmp/ray/session_*):
    the driver logs at ERROR, worker output is not forwarded, and the raylet's "N worker processes
    started" warning (Ray counts its own short-lived Ray Data and Train workers) is not raised on
    small machines.
    """
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            kwargs["address"] = address
        else:
            kwargs["address"] = "local"
            kwargs["num_cpus"] = num_cpus or os.cpu_count()
            kwargs["include_dashboard"] = False
            if quiet:
                # Read by the raylet this call starts (a RAY_<config> environment override).
                startup = max(16, 4 * int(kwargs["num_cpus"]))
                os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(startup))
        if quiet:
            kwargs["logging_level"] = logging.ERROR
        kwargs["runtime_env"] = runtime_env()
        try:
            ray.init(**kwargs)
        except ConnectionError as error:
            raise ConnectionError(
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
    """Environment for every Ray worker: W&B offline unless the user chose, no Ray Data progress spam."""
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    for key in ("WANDB_API_KEY", "WANDB_DIR", "MEDOOD_SALT"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"env_vars": env}


def submit_command(medood_args: list[str], *, address: str = "http://127.0.0.1:8265", working_dir: str = ".") -> str:
    """The `ray job submit` command line that runs ``medood <args>`` on a cluster."""
    args = " ".join(shlex.quote(a) for a in medood_args)
    return (
        f"RAY_AUTH_MODE=token ray job submit --address {shlex.quote(address)} "
        f"--working-dir {shlex.quote(working_dir)} -- medood {args}"
    )
