"""Ray Tune sweeps: a method's search space or one of its ablation grids, one Ray Train run per trial.

``sweep(SweepOptions(...))`` (and ``medood tune``) reads ``medood/search_spaces/<method>.yaml``, checks
every setting against the method's ``Config`` before Ray starts, and runs a ``Tuner`` whose trials each
call ``medood.platform.train.train`` with ``TuneReportCallback``, so the per-epoch metrics of the
trial's ``TorchTrainer`` reach Tune and ASHA (``time_attr`` = epoch, ``max_t`` = the method's epochs
over all its stages) can stop weak trials early. A space is sampled (ASHA by default); an ablation
runs each of its settings, every one to the end by default (FIFO), as the paper's table did, and
``samples`` > 1 repeats it with that many seeds (mean ± std). Afterwards it writes, in the sweep
folder:

- ``results.csv``: one row per trial (parameters, metrics at the trial's best checkpoint, epochs run,
  wall time, checkpoint path, status);
- ``results.md``: for an ablation, a table shaped like the paper's (rows = its settings, columns =
  AUROC / AP, with the paper's figure beside ours); for a space, the trials ranked by the metric;
- ``plots/``: the metric against each swept parameter, and every trial's metric per epoch;
- ``best.json``: the best trial, its config and ``checkpoint`` (its best checkpoint folder), which
  ``medood evaluate`` and serving accept (``medood.platform.checkpoint.resolve``).

Resources. A trial's driver (the Tune function trainable) only waits on its ``TorchTrainer``, so it
asks for no CPU, only a little memory (a placement-group bundle cannot be empty). Each trial then
needs ``workers_per_trial * cpus_per_trial`` CPUs for its Train workers plus one for its Ray Data
tasks (they ask for one CPU each), so trials run one at a time on a 2-CPU machine; with fractional
``gpus_per_trial`` several trials share a GPU (the Train workers hold the GPU share, not the trial
driver). ``max_concurrent`` defaults to what the cluster fits. A trial that Tune stops leaves its
workers' placement group behind; ``PlacementGroupReaper`` gives those CPUs back (see there).

The metric. Trials are ranked on the val split with the metric the trainable keeps checkpoints by:
``val_auroc`` (max) when val holds normal and abnormal cases, else ``val_loss`` (min), the same
fallback ``train`` makes, so ASHA, the tables and ``best.json`` agree with each run's own checkpoints.

Resuming. ``resume=True`` (``medood tune --resume``) restores the experiment in the sweep folder
with ``Tuner.restore(..., resume_errored=True)``: finished trials are kept as they are, interrupted
or failed ones start again, and a trial's Train run resumes from its own latest checkpoint (its run
folder is the same). The sweep's settings come back from ``sweep.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from medood import methods
from medood import search_spaces as spaces
from medood.platform import checkpoint as ckpt
from medood.platform import storage

SCHEDULERS = ("asha", "fifo")
SWEEP_FILE = "sweep.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PLOTS_DIR = "plots"
DEFAULT_SPACE_SAMPLES = 8
# Ray Data's read and map tasks each ask for one CPU; a trial needs one besides its Train workers.
DATA_CPUS_PER_TRIAL = 1
# The trial driver only waits on its TorchTrainer: no CPU, and a bundle cannot be empty.
DRIVER_MEMORY_BYTES = 256 * 1024**2
METRIC_COLUMNS = ("val_auroc", "val_ap", "val_sensitivity", "val_loss", "train_loss")


@dataclass
class SweepOptions:
    """Everything a sweep needs. Mirrors ``medood tune``'s flags."""

    method: str
    data: str
    space: str = "default"  # "default" (the method's file) or the path of a YAML file in that format
    ablation: str | None = None
    preset: str | None = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    samples: int | None = None  # space: trials sampled (8); ablation: seeds per setting (1)
    scheduler: str | None = None  # space: asha; ablation: fifo (a paper's table trains every row to the end)
    metric: str = "val_auroc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0
    gpus_per_trial: float = 0.0
    cpus_per_trial: int = 1
    workers_per_trial: int = 1
    max_concurrent: int | None = None
    out: str | None = None
    resume: bool = False
    wandb: bool = True
    seed: int = 0  # seeds the sampling of the space
    aux_data: str | None = None  # auxiliary image shards for the trials that train on them (TrainOptions.aux_data)

    def default_out(self) -> str:
        return str(Path("runs") / f"tune-{self.method}-{self.ablation or 'space'}")


@dataclass
class SweepResult:
    path: str
    metric: str
    mode: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    interrupted: bool
    skipped: list[dict[str, str]]

    @property
    def trial_epochs(self) -> int:
        """Epochs trained over all trials (what ASHA saves)."""
        return sum(int(t["epochs_run"]) for t in self.trials)


def sweep(options: SweepOptions) -> SweepResult:
    """Run (or, with ``options.resume``, continue) a sweep and write its results; see the module doc."""
    from ray import tune

    from medood.platform.jobs import ensure_ray

    out = storage.location(options.out or options.default_out())  # a local folder or s3://bucket/prefix

    def can_restore() -> bool:
        return tune.Tuner.can_restore(out.path, storage_filesystem=out.ray_filesystem)

    if options.resume:
        if not (out / SWEEP_FILE).is_file() or not can_restore():
            raise FileNotFoundError(f"{out}: no interrupted sweep to resume (no {SWEEP_FILE} / Tune experiment state)")
        plan = json.loads((out / SWEEP_FILE).read_text())
        plan["path"] = out.uri  # the folder may have moved since
        ensure_ray()
        tuner = tune.Tuner.restore(
            out.path, trainable=_trainable(plan), resume_errored=True, storage_filesystem=out.ray_filesystem
        )
    else:
        plan = make_plan(options, out)
        if (out / SWEEP_FILE).exists() or can_restore():
            raise ValueError(f"{out} already holds a sweep; pass --resume to continue it, or choose another --out")
        resources = ensure_ray()
        plan["max_concurrent"] = options.max_concurrent or default_max_concurrent(plan, resources)
        out.makedirs()
        _write_json(out / SWEEP_FILE, plan)
        tuner = _make_tuner(plan, out)
    _no_credentials_in_trial_runtime_envs()
    reaper = PlacementGroupReaper.for_plan(plan)
    reaper.start()
    try:
        with _legacy_tune_output():
            tuner.fit()  # Ctrl+C: Tune saves the experiment state and returns; trials left over are PENDING
    finally:
        reaper.stop(final=True)
    trials = collect_trials(out, plan)
    interrupted = any(t["tune_status"] not in ("TERMINATED", "ERROR") for t in trials)
    return write_results(out, plan, trials, interrupted=interrupted)


# What Ray Tune copies from the driver's environment into every trial actor's runtime env.
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _no_credentials_in_trial_runtime_envs() -> None:
    """Keep the driver's S3 credentials out of the trials' runtime envs.

    Ray Tune (2.60, ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``) copies ``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY`` from the driver into the runtime env of every trial actor, where the
    runtime env agent writes them to its log (``runtime_env_agent.log``) and the state API shows them.
    medood's credentials come from each node's own environment (README, "Object storage"), which the
    trial processes inherit, so the copy is not needed; ``tests/test_cluster.py`` checks the node logs.
    A private Ray name: where a Ray version lacks it there is nothing to remove.
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # pragma: no cover - a Ray without the module
        return
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update(_CREDENTIAL_VARIABLES)


@contextlib.contextmanager
def _legacy_tune_output() -> Any:
    """Tune's legacy reporter for this fit: with ``verbose=0`` it prints nothing, where the new output
    engine (``RAY_AIR_NEW_OUTPUT``, on by default) still prints its "Configuration for experiment" box.
    The sweep's progress is ``_trial_progress``'s one line per trial epoch."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def make_plan(options: SweepOptions, out: str | os.PathLike[str] | storage.Location) -> dict[str, Any]:
    """Resolve and check a sweep before Ray starts: settings, param space, metric, ASHA's budget.

    The plan is plain JSON (``sweep.json``), so ``--resume`` rebuilds the same trainable from it.
    """
    out = storage.location(out)
    from medood.platform.data.stream import read_manifest, split_count
    from medood.platform.train import TrainOptions, _effective_metric

    cls = methods.get(options.method)
    scheduler = options.scheduler or ("fifo" if options.ablation else "asha")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    if options.mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {options.mode!r}")
    if options.grace_period < 1 or options.reduction_factor <= 1:
        raise ValueError("grace_period must be >= 1 and reduction_factor > 1")
    if options.samples is not None and options.samples < 1:
        raise ValueError(f"samples must be >= 1, got {options.samples}")
    space_path = None if options.space in ("default", None) else Path(options.space).resolve()
    search = spaces.load(options.method, space_path)
    base = dict(options.overrides)
    base_config = cls.make_config(options.preset, base)  # unknown keys / bad values fail here
    manifest = read_manifest(options.data)
    if not split_count(options.data, "val"):
        raise ValueError(
            f"{options.data}: the val split is empty; a sweep ranks trials on it (ingest with a val fraction > 0)"
        )
    metric, mode = _effective_metric(
        TrainOptions(method=options.method, data=options.data, metric=options.metric, mode=options.mode), manifest
    )
    plan: dict[str, Any] = {
        "name": out.name,
        "path": out.uri,
        "method": options.method,
        "data": storage.location(options.data).uri,
        "preset": options.preset,
        "overrides": base,
        "data_options": dict(options.data_options),
        "aux_data": storage.location(options.aux_data).uri if options.aux_data else None,
        "metric": metric,
        "mode": mode,
        "requested_metric": [options.metric, options.mode],
        "scheduler": scheduler,
        "grace_period": int(options.grace_period),
        "reduction_factor": float(options.reduction_factor),
        "gpus_per_trial": float(options.gpus_per_trial),
        "cpus_per_trial": int(options.cpus_per_trial),
        "workers_per_trial": int(options.workers_per_trial),
        "wandb": bool(options.wandb),
        "seed": int(options.seed),
        "space_file": search.path,
        "ablation": None,
        "space": None,
        "skipped": [],
    }
    if options.ablation:
        ablation = search.ablation(options.ablation)
        clash = sorted(set(base) & set(ablation.swept))
        if clash:
            raise ValueError(f"--set {', '.join(clash)} clashes with what ablation {ablation.name!r} sweeps")
        good, bad = spaces.valid_settings(ablation, options.method, options.preset, base)
        if not options.aux_data:  # rows that train on auxiliary images are skipped, with the reason, without them
            needs_aux = [s for s in good if cls.uses_auxiliary_images(cls.make_config(options.preset, {**base, **s.overrides}))]
            good = [s for s in good if s not in needs_aux]
            bad = bad + [(s, "trains on auxiliary images: name their shards with --aux-data") for s in needs_aux]
        if not good:
            reasons = "; ".join(f"{s.label}: {why}" for s, why in bad)
            raise ValueError(f"no setting of ablation {ablation.name!r} is valid for preset {options.preset!r}: {reasons}")
        repeats = options.samples or 1
        plan["ablation"] = {
            "name": ablation.name,
            "description": ablation.description,
            "source": ablation.source,
            "form": ablation.form,
            "swept": list(ablation.swept),
            "settings": [{"label": s.label, "overrides": s.overrides, "paper": s.paper} for s in good],
            "seeds": [int(base_config.seed) + i for i in range(repeats)],
        }
        plan["skipped"] = [{"label": s.label, "reason": why} for s, why in bad]
        plan["num_samples"] = 1
        configs = [cls.make_config(options.preset, {**base, **s.overrides}) for s in good]
    else:
        clash = sorted(set(base) & set(search.swept))
        if clash:
            raise ValueError(f"--set {', '.join(clash)} clashes with what the space sweeps")
        spaces.check_values(search, options.preset, base, seed=options.seed)
        plan["space"] = {
            k: {"kind": v.kind, "args": list(v.args)} if isinstance(v, spaces.Distribution) else {"value": v}
            for k, v in search.space.items()
        }
        plan["swept"] = list(search.swept)
        plan["num_samples"] = options.samples or DEFAULT_SPACE_SAMPLES
        rng = random.Random(options.seed)
        configs = [cls.make_config(options.preset, {**base, **search.sample(rng)}) for _ in range(16)]
    plan["max_t"] = max(total_epochs(options.method, c) for c in [base_config, *configs])
    if not options.aux_data and any(cls.uses_auxiliary_images(c) for c in [base_config, *configs]):
        raise ValueError(
            f"this sweep trains {options.method} on auxiliary images (neg_source aux or both): "
            "name their shard folder with --aux-data SHARDS"
        )
    if scheduler == "asha" and options.grace_period > plan["max_t"]:
        raise ValueError(f"grace_period {options.grace_period} exceeds the runs' {plan['max_t']} epochs")
    return plan


def total_epochs(method: str, config: Any) -> int:
    """Epochs of all the method's stages for ``config`` (ASHA's ``max_t``); built on the meta device."""
    import torch

    cls = methods.get(method)
    try:
        with torch.device("meta"):
            model = cls(config)
    except (RuntimeError, NotImplementedError):  # a method whose constructor needs real tensors
        model = cls(config)
    return sum(stage.epochs for stage in model.stages())


def default_max_concurrent(plan: dict[str, Any], resources: dict[str, float]) -> int:
    """Trials the cluster can run at once: CPUs per trial = Train workers' CPUs + Ray Data's CPU."""
    workers = max(1, int(plan["workers_per_trial"]))
    per_trial_cpus = workers * max(1, int(plan["cpus_per_trial"])) + DATA_CPUS_PER_TRIAL
    fit = int(resources.get("CPU", 1) // per_trial_cpus)
    gpus = float(plan["gpus_per_trial"])
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0) // (workers * gpus)))
    return max(1, fit)


def run_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """The Tune function trainable: one ``train`` run in ``<trial dir>/run``, its epochs reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medood.platform.train import train

    # The trial's folder in the sweep (get_trial_dir() is Tune's local staging copy, not the storage).
    trial_dir = storage.location(plan["path"]) / tune.get_context().get_trial_name()
    finished = trial_dir / "run" / ckpt.RUN_FILE  # written once, when the trial's run has trained every epoch
    if finished.exists():
        # A run that ended after the sweep's last experiment snapshot (its driver killed in between) is
        # started again by `tune --resume`: report its epochs to Tune from its record instead of training
        # or writing anything again.
        for metrics in json.loads(finished.read_text()).get("history", []):
            tune.report(metrics)
        return
    train(trial_options(plan, config, trial_dir), callbacks=[TuneReportCallback()])


def trial_options(plan: dict[str, Any], config: dict[str, Any], trial_dir: storage.Location) -> Any:
    """The ``TrainOptions`` of one trial. Trials running at once share Ray's object store, so each may
    keep its preprocessed splits in only its share of it (``store_share``); beyond that it streams."""
    from medood.platform.train import TrainOptions

    return TrainOptions(
        method=plan["method"],
        data=plan["data"],
        out=(trial_dir / "run").uri,
        preset=plan["preset"],
        overrides=trial_overrides(plan, config),
        data_options=plan["data_options"],
        aux_data=plan.get("aux_data"),  # sweeps planned before auxiliary data existed have none
        workers=int(plan["workers_per_trial"]),
        cpus_per_worker=int(plan["cpus_per_trial"]),
        gpus_per_worker=float(plan["gpus_per_trial"]),
        metric=plan["metric"],
        mode=plan["mode"],
        wandb=bool(plan["wandb"]),
        wandb_group=plan["name"],
        progress=False,  # Tune prints its own trial table
        store_share=1.0 / max(1, int(plan["max_concurrent"])),
    )


def trial_overrides(plan: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of one trial: ``--set`` values, then its setting or its sampled values."""
    overrides = dict(plan["overrides"])
    if plan["ablation"]:
        setting = _setting(plan, config["setting"])
        overrides.update(setting["overrides"])
        if "seed" in config:
            overrides["seed"] = config["seed"]
    else:
        overrides.update({k: v for k, v in config.items() if k in plan["space"]})
    return overrides


def param_space(plan: dict[str, Any]) -> dict[str, Any]:
    """The Tune param space of a plan: a grid over an ablation's settings (x seeds), or the distributions."""
    from ray import tune

    if plan["ablation"]:
        labels = [s["label"] for s in plan["ablation"]["settings"]]
        space: dict[str, Any] = {"setting": tune.grid_search(labels)}
        seeds = plan["ablation"]["seeds"]
        if len(seeds) > 1:
            space["seed"] = tune.grid_search(seeds)
        return space
    make = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "quniform": lambda a: tune.quniform(*a),
    }
    return {
        key: axis["value"] if "value" in axis else make[axis["kind"]](list(axis["args"]))
        for key, axis in plan["space"].items()
    }


# -- results ------------------------------------------------------------------------------------


def collect_trials(out: storage.Location, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial of the experiment in ``out``: status, config, per-epoch history, error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(out.path, storage_filesystem=out.ray_filesystem)
    frames = analysis.trial_dataframes
    trials = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = [] if frame is None or frame.empty else frame.to_dict("records")
        error = None
        if trial.status == "ERROR":
            text = str(trial.get_error() or "")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            error = (lines[-1] if lines else "error")[:300]
        trials.append(
            {
                "trial": out.at(trial.path).name,
                "trial_id": trial.trial_id,
                "trial_dir": out.at(trial.path).uri,
                "tune_status": trial.status,
                "config": dict(trial.config),
                "history": rows,
                "error": error,
            }
        )
    return trials


def write_results(
    out: str | os.PathLike[str] | storage.Location,
    plan: dict[str, Any],
    trials: list[dict[str, Any]],
    *,
    interrupted: bool = False,
) -> SweepResult:
    """``results.csv``, ``results.md``, ``plots/`` and ``best.json`` from the collected trials."""
    out = storage.location(out)
    rows = [_summarise(plan, t) for t in trials]
    order = {s["label"]: i for i, s in enumerate(plan["ablation"]["settings"])} if plan["ablation"] else {}
    rows.sort(key=lambda r: (order.get(r.get("setting"), 0), r.get("seed", 0), r["trial"]))
    best = _best(plan, rows)
    with storage.staged_folder(out) as staged:  # csv and PNGs are written locally, then uploaded
        _write_csv(staged / RESULTS_CSV, plan, rows)
        plots = _write_plots(staged / PLOTS_DIR, plan, rows)
        (staged / RESULTS_MD).write_text(_render_markdown(plan, rows, best, plots, out, interrupted, staged))
    if best is not None:
        _write_json(out / ckpt.BEST_FILE, best)
    else:  # no trial has a checkpoint (yet): never leave an older best.json behind
        (out / ckpt.BEST_FILE).unlink(missing_ok=True)
    return SweepResult(
        path=out.uri,
        metric=plan["metric"],
        mode=plan["mode"],
        trials=rows,
        best=best,
        interrupted=interrupted,
        skipped=list(plan["skipped"]),
    )


def _summarise(plan: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """One results row: parameters, the metrics of the trial's best epoch, epochs, time, checkpoint."""
    metric, sign = plan["metric"], 1.0 if plan["mode"] == "max" else -1.0
    run_dir = storage.location(trial["trial_dir"]) / "run"
    by_epoch, wall = _epochs(trial["history"], run_dir)
    history = [by_epoch[e] for e in sorted(by_epoch)]
    epochs_run = max(by_epoch, default=0)
    scored = [h for h in history if _number(h.get(metric)) is not None]
    kept = [h for h in scored if _has_checkpoint(h)]
    best_row = max(kept or scored, key=lambda h: sign * float(h[metric]), default=None)
    checkpoint = None
    if best_row is not None and _has_checkpoint(best_row):
        checkpoint = str(best_row["checkpoint_path"])  # an absolute path or a URI (see _epochs)
    if trial["tune_status"] == "TERMINATED":
        status = "complete" if epochs_run >= plan["max_t"] else "stopped early"
    elif trial["tune_status"] == "ERROR":
        status = "error"
    else:  # an interrupted sweep: Tune sets the trials it was running back to PENDING
        status = "unfinished" if history or run_dir.is_dir() else "pending"
    config = trial["config"]
    row: dict[str, Any] = {"trial": trial["trial"], "status": status}
    if plan["ablation"]:
        row["setting"] = config.get("setting")
        if len(plan["ablation"]["seeds"]) > 1:
            row["seed"] = config.get("seed")
        resolved = _resolved(plan, config) if config.get("setting") else {}
        for key in plan["ablation"]["swept"]:
            row[key] = resolved.get(key)
    else:
        for key in plan["swept"]:
            row[key] = config.get(key)
    row["epochs_run"] = epochs_run
    row["best_epoch"] = None if best_row is None else int(best_row["epoch"])
    for key in dict.fromkeys((*METRIC_COLUMNS, metric)):
        row[key] = None if best_row is None else _number(best_row.get(key))
    row["wall_time_s"] = round(wall, 1)
    row["checkpoint"] = checkpoint
    row["trial_dir"] = trial["trial_dir"]
    row["error"] = trial["error"]
    row["curve"] = [(int(h["epoch"]), float(h[metric])) for h in scored]
    row["config"] = config
    return row


def _epochs(reported: list[dict[str, Any]], run_dir: storage.Location) -> tuple[dict[int, dict[str, Any]], float]:
    """A trial's metrics per epoch, and the seconds Tune saw it train.

    Mostly what Tune received. A trial can also train epochs Tune never hears of: after a stop or
    an interruption its run goes on for a moment, and a resumed run then has nothing left to report.
    The run's own record fills those in: ``run.json`` (written when the run ends) and the metrics in
    its checkpoints. Checkpoint paths come back as users name them: absolute local paths, or URIs.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    run_file = run_dir / ckpt.RUN_FILE
    if run_file.is_file():
        for entry in json.loads(run_file.read_text()).get("history", []):
            if _number(entry.get("epoch")) is not None:
                by_epoch[int(entry["epoch"])] = dict(entry)
    wall = 0.0
    for row in reported:
        wall += _number(row.get("time_this_iter_s")) or 0.0
        if _number(row.get("epoch")) is not None:  # an epoch reported twice (resumed): the last counts
            row = dict(row)
            if isinstance(row.get("checkpoint_path"), str) and row["checkpoint_path"]:
                # Ray reports a path inside the run's filesystem (bucket/key on object storage)
                where = run_dir.at(row["checkpoint_path"])
                row["checkpoint_path"] = storage.location(where.path).uri if where.is_local else where.uri
            by_epoch[int(row["epoch"])] = {**by_epoch.get(int(row["epoch"]), {}), **row}
    referenced = {r["checkpoint_path"] for r in by_epoch.values() if _has_checkpoint(r)}
    for name in run_dir.listdir("checkpoint_*"):
        folder = run_dir / name
        if folder.uri in referenced or not (folder / ckpt.MODEL_FILE).is_file():
            continue
        metrics = ckpt.read_payload(folder / ckpt.MODEL_FILE).get("metrics", {})
        if _number(metrics.get("epoch")) is not None:
            epoch = int(metrics["epoch"])
            by_epoch[epoch] = {**metrics, **by_epoch.get(epoch, {}), "checkpoint_path": folder.uri}
    return by_epoch, wall


def _has_checkpoint(row: dict[str, Any]) -> bool:
    path = row.get("checkpoint_path")
    return isinstance(path, str) and bool(path) and (storage.location(path) / ckpt.MODEL_FILE).is_file()


def _best(plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    metric, sign = plan["metric"], 1.0 if plan["mode"] == "max" else -1.0
    candidates = [r for r in rows if r["checkpoint"] and r.get(metric) is not None]
    if not candidates:
        return None
    row = max(candidates, key=lambda r: sign * r[metric])
    overrides = trial_overrides(plan, row["config"])
    config = methods.get(plan["method"]).make_config(plan["preset"], overrides)
    return {
        "sweep": plan["name"],
        "method": plan["method"],
        "preset": plan["preset"],
        "data": plan["data"],
        "metric": metric,
        "mode": plan["mode"],
        "trial": row["trial"],
        "trial_dir": row["trial_dir"],
        "setting": row.get("setting"),
        "overrides": overrides,
        "config": asdict(config),
        "epoch": row["best_epoch"],
        "metrics": {k: row[k] for k in dict.fromkeys((*METRIC_COLUMNS, metric)) if row.get(k) is not None},
        "checkpoint": row["checkpoint"],
    }


def _param_columns(plan: dict[str, Any]) -> list[str]:
    if plan["ablation"]:
        seeds = ["seed"] if len(plan["ablation"]["seeds"]) > 1 else []
        return ["setting", *seeds, *plan["ablation"]["swept"]]
    return list(plan["swept"])


def _write_csv(path: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    metric_columns = list(dict.fromkeys((*METRIC_COLUMNS, plan["metric"])))
    columns = [
        "trial", "status", *_param_columns(plan), "epochs_run", "best_epoch", *metric_columns,
        "wall_time_s", "checkpoint", "trial_dir", "error",
    ]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    os.replace(tmp, path)


def _render_markdown(
    plan: dict[str, Any],
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    plots: list[Path],
    out: storage.Location,
    interrupted: bool,
    staged: Path,
) -> str:
    metric, mode = plan["metric"], plan["mode"]
    ablation = plan["ablation"]
    title = f"Ablation `{ablation['name']}`" if ablation else "Search space"
    lines = [f"# {title}: {plan['method']} (preset `{plan['preset']}`)", ""]
    if ablation:
        if ablation["description"]:
            lines += [ablation["description"], ""]
        if ablation["source"]:
            lines += [f"Source: {ablation['source']}.", ""]
    done = sum(r["status"] in ("complete", "stopped early") for r in rows)
    lines += [
        f"Data `{plan['data']}`; {len(rows)} trials ({done} finished), scheduler `{plan['scheduler']}`, "
        f"ranked by `{metric}` ({mode}) on the val split, at each trial's best checkpoint; "
        f"{sum(r['epochs_run'] for r in rows)} trial-epochs of at most {plan['max_t']} per trial.",
        "",
    ]
    if plan["requested_metric"][0] != metric:
        lines += [f"The val split has no labels to rank by `{plan['requested_metric'][0]}`; ranked by `{metric}`.", ""]
    if interrupted:
        lines += ["**Interrupted**: resume with `medood tune --resume --out " + out.uri + "`.", ""]
    lines += _ablation_table(plan, rows) if ablation else _ranking_table(plan, rows)
    agreement = sensitivity_agreement(rows)
    if agreement is not None:
        rho, p_value, n = agreement
        lines += ["", f"Label-free sensitivity vs val AUROC across {n} trials: Spearman rho = {rho:+.3f} "
                  f"(p = {p_value:.3f}); a positive rho means the sensitivity score ranks the trials as the labels do."]
    if plan["skipped"]:
        lines += ["", f"Settings not run (invalid for preset `{plan['preset']}`):", ""]
        lines += [f"- {s['label']}: {s['reason']}" for s in plan["skipped"]]
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- `{r['trial']}`: {r['error']}" for r in errors]
    if best is not None:
        lines += [
            "",
            f"Best trial: `{best['trial']}`"
            + (f" ({best['setting']})" if best.get("setting") else "")
            + f", {metric} = {best['metrics'][metric]:.4f} at epoch {best['epoch']}; checkpoint `{best['checkpoint']}` "
            f"(`{ckpt.BEST_FILE}`).",
        ]
    if plots:
        lines += [""] + [f"![{p.stem}]({p.relative_to(staged).as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def sensitivity_agreement(rows: list[dict[str, Any]]) -> tuple[float, float, int] | None:
    """Spearman correlation of ``val_sensitivity`` with ``val_auroc`` over the trials that report both
    (Rafiee thesis Sec. 7: the label-free score should rank models as the labels do); None under 3 trials."""
    pairs = [(r["val_sensitivity"], r["val_auroc"]) for r in rows
             if _number(r.get("val_sensitivity")) is not None and _number(r.get("val_auroc")) is not None]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    result = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    if not math.isfinite(float(result.statistic)):
        return None
    return float(result.statistic), float(result.pvalue), len(pairs)


def _ablation_table(plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Rows = the ablation's settings in the paper's order; columns = AUROC / AP (mean ± std over seeds)."""
    ablation, metric = plan["ablation"], plan["metric"]
    grid_form = ablation["form"] == "grid"
    head = list(ablation["swept"]) if grid_form else ["Setting"]
    value_columns = [("val_auroc", "AUROC"), ("val_ap", "AP")]
    if metric not in ("val_auroc", "val_ap"):
        value_columns.append((metric, metric))
    # The paper's figures, one column per metric the paper reports (AUROC; AP; voxel AP for MOOD tables).
    paper_names = {"auroc": "paper AUROC", "ap": "paper AP", "pixel_ap": "paper voxel AP"}
    paper_keys = [k for k in spaces.PAPER_METRICS if any(k in s["paper"] for s in ablation["settings"])]
    has_paper = bool(paper_keys)
    seeds = len(ablation["seeds"])
    columns = head + [name for _, name in value_columns] + ["epochs"]
    columns += [paper_names.get(k, f"paper {k}") for k in paper_keys]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for setting in ablation["settings"]:
        group = [r for r in rows if r.get("setting") == setting["label"]]
        if grid_form:
            cells = [spaces.format_value(setting["overrides"][k]) for k in ablation["swept"]]
        else:
            cells = [setting["label"]]
        for key, _ in value_columns:
            cells.append(_mean_std([r.get(key) for r in group], seeds))
        epochs = [r["epochs_run"] for r in group]
        cells.append("/".join(str(e) for e in epochs) if epochs else "–")
        epochs_cell = len(cells) - 1
        for key in paper_keys:
            paper = setting["paper"].get(key)
            cells.append("–" if paper is None else f"{paper:.3f}")
        if any(r["status"] not in ("complete", "stopped early") for r in group) or not group:
            cells[epochs_cell] += " (" + ", ".join(sorted({r["status"] for r in group} or {"not run"})) + ")"
        lines.append("| " + " | ".join(cells) + " |")
    note = f"AUROC / AP on the val split; mean ± std over {seeds} seeds." if seeds > 1 else "AUROC / AP on the val split."
    if has_paper:
        note += " Paper: the published test-set figures."
    return lines + ["", note]


def _ranking_table(plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    metric, sign = plan["metric"], 1.0 if plan["mode"] == "max" else -1.0
    ranked = sorted(rows, key=lambda r: -sign * r[metric] if r.get(metric) is not None else math.inf)
    swept = list(plan["swept"])
    columns = ["trial", *swept, "AUROC", "AP"] + ([metric] if metric not in ("val_auroc", "val_ap") else [])
    columns += ["epochs", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in ranked:
        cells = [r["trial"], *(spaces.format_value(r.get(k)) for k in swept)]
        cells += [_fmt(r.get("val_auroc")), _fmt(r.get("val_ap"))]
        cells += [_fmt(r.get(metric))] if metric not in ("val_auroc", "val_ap") else []
        cells += [str(r["epochs_run"]), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write_plots(folder: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """The metric against each swept parameter, and each trial's metric per epoch (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    metric = plan["metric"]
    done = [r for r in rows if r.get(metric) is not None]
    written: list[Path] = []
    ablation = plan["ablation"]
    if ablation and ablation["form"] == "rows":
        labels = [s["label"] for s in ablation["settings"]]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.5))
        for i, label in enumerate(labels):
            values = [r[metric] for r in done if r.get("setting") == label]
            ax.scatter(values, [i] * len(values), color="C0", zorder=3, label="trials" if i == 0 else None)
            if values:
                ax.barh(i, statistics.fmean(values), color="C0", alpha=0.3)
            paper = ablation["settings"][i]["paper"].get("auroc")
            if paper is not None and metric == "val_auroc":
                ax.scatter([paper], [i], marker="x", color="C3", zorder=4, label="paper (test)" if i == 0 else None)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(metric)
        ax.set_title(f"{plan['method']}: {ablation['name']}")
        ax.legend(loc="lower right", fontsize=8)
        written.append(_save(fig, folder / f"{metric}_by_setting.png"))
    else:
        swept = list(ablation["swept"]) if ablation else list(plan["swept"])
        log_axes = {k for k, a in (plan["space"] or {}).items() if a.get("kind") == "loguniform"}
        for key in swept:
            values = [r.get(key) for r in done]
            if not values:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric:
                xs = [float(v) for v in values]
            else:
                categories = sorted({spaces.format_value(v) for v in values})
                xs = [categories.index(spaces.format_value(v)) for v in values]
                ax.set_xticks(range(len(categories)), categories)
            ax.scatter(xs, [r[metric] for r in done], color="C0", zorder=3)
            if ablation and numeric:
                points = sorted({x for x in xs})
                means = [statistics.fmean(r[metric] for r, x in zip(done, xs) if x == p) for p in points]
                ax.plot(points, means, color="C0", alpha=0.6)
                for s in ablation["settings"]:
                    paper = s["paper"].get("auroc")
                    if paper is not None and metric == "val_auroc" and key in s["overrides"]:
                        ax.scatter([float(s["overrides"][key])], [paper], marker="x", color="C3", label="paper (test)")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            if key in log_axes:
                ax.set_xscale("log")
            elif numeric and all(isinstance(v, int) for v in values):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.set_title(f"{plan['method']}: {metric} vs {key}")
            ax.grid(alpha=0.3)
            written.append(_save(fig, folder / f"{metric}_vs_{_slug(key)}.png"))
    curves = [r for r in rows if r["curve"]]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in curves:
            epochs, values = zip(*r["curve"])
            ax.plot(epochs, values, marker="o", markersize=3, label=r.get("setting") or r["trial"])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{plan['method']}: {metric} per epoch ({plan['scheduler']})")
        if len(curves) <= 12:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / "curves.png"))
    return written


# -- placement groups left behind by stopped trials ---------------------------------------------


class PlacementGroupReaper:
    """Removes the Ray Train worker placement groups of trials that Tune stopped, while a sweep runs.

    When ASHA stops a trial (or a sweep is interrupted), Tune ends the trial's actor; the trial's
    ``TorchTrainer`` controller dies with it, and so do its workers, but not the placement group
    the controller reserved for them: a placement group belongs to the job, not to the actor that
    made it. Ray Train's own cleaner finds dead controllers through the State API, which needs the
    dashboard's HTTP server (``ensure_ray`` starts Ray without it) and a single Ray instance on the
    machine. Without it the group holds its CPUs for good, and on a 2-CPU machine the next trial
    waits for them for good.

    A background thread looks at this job's placement groups every ``interval_s``. Trials are seen
    through their own groups (the trial driver's memory-only bundle). A worker group (a trial's
    worker bundles) is removed once it is older than every live trial's group (so the trial that
    made it has ended), no actor is placed in it, and no trial has ended for ``settle_s`` (by then
    the ended trial's controller is gone and cannot start new workers). ``stop(final=True)`` after
    the sweep removes whatever worker group is left.
    """

    def __init__(
        self,
        worker_bundle: dict[str, float],
        workers: int,
        driver_bundle: dict[str, float],
        interval_s: float = 1.0,
        settle_s: float = 3.0,
    ) -> None:
        self.worker_bundle = _bundle(worker_bundle)
        self.workers = int(workers)
        self.driver_bundle = _bundle(driver_bundle)
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.removed: list[str] = []
        self._before: set[str] = set()
        self._job = ""
        self._first_seen: dict[str, float] = {}
        self._trials: set[str] = set()
        self._last_end = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_plan(cls, plan: dict[str, Any]) -> PlacementGroupReaper:
        worker = {"CPU": float(plan["cpus_per_trial"]), "GPU": float(plan["gpus_per_trial"])}
        return cls(worker, int(plan["workers_per_trial"]), _driver_resources())

    def start(self) -> None:
        """Note the groups that exist now (never ours to remove) and start watching."""
        import ray

        self._job = ray.get_runtime_context().get_job_id()
        self._before = set(ray.util.placement_group_table())
        self._thread = threading.Thread(target=self._watch, name="placement-group-reaper", daemon=True)
        self._thread.start()

    def stop(self, final: bool = True, timeout_s: float = 30.0) -> None:
        """Stop watching; with ``final``, remove every worker group left (the sweep has ended).

        At once, so that the workers of a trial Tune is still shutting down train no further, and
        again once the trials' own groups are gone, for a group a dying controller made meanwhile.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not final:
            return
        self.reap(final=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._groups()[0]:
            time.sleep(0.5)
        time.sleep(self.settle_s)
        self.reap(final=True)

    def reap(self, final: bool = False) -> list[str]:
        """One look: remove the worker groups of ended trials (all worker groups with ``final``)."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        now = time.monotonic()
        trials, workers = self._groups()
        for pg_id in trials | workers:
            self._first_seen.setdefault(pg_id, now)
        if self._trials - trials:  # a trial's group went away: that trial just ended
            self._last_end = now
        self._trials = trials
        oldest_trial = min((self._first_seen[t] for t in trials), default=math.inf)
        settled = now - self._last_end >= self.settle_s
        available, total = ray.available_resources(), ray.cluster_resources()
        removed = []
        for pg_id in sorted(workers):
            key = f"bundle_group_{pg_id}"  # every actor placed in the group holds a little of this
            idle = available.get(key, 0.0) >= total.get(key, math.inf)
            if final or (self._first_seen[pg_id] < oldest_trial and settled and idle):
                try:
                    remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
                except Exception:  # removed meanwhile by its own controller
                    continue
                removed.append(pg_id)
        self.removed.extend(removed)
        return removed

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reap()
            except Exception:  # a transient GCS hiccup must not end the watch
                continue

    def _groups(self) -> tuple[set[str], set[str]]:
        """This job's live trial-driver groups and worker groups, created since ``start``."""
        import ray

        trials, workers = set(), set()
        for pg_id, info in ray.util.placement_group_table().items():
            if pg_id in self._before or info.get("state") == "REMOVED" or not pg_id.endswith(self._job):
                continue
            shape = [_bundle(b) for b in info.get("bundles", {}).values()]
            if shape == [self.driver_bundle]:
                trials.add(pg_id)
            elif len(shape) == self.workers and all(b == self.worker_bundle for b in shape):
                workers.add(pg_id)
        return trials, workers


# -- the CLI ------------------------------------------------------------------------------------


def tune_command(
    method: str = typer.Option(None, "--method", "-m", help="Registered method name (see `medood methods`)."),
    data: str = typer.Option(None, "--data", "-d", help="Shard folder (or s3://bucket/prefix) written by `medood ingest`."),
    space: str = typer.Option("default", help="default (medood/search_spaces/<method>.yaml) or a YAML file."),
    ablation: str = typer.Option(None, help="Run one named ablation grid of the space file instead of the space."),
    preset: str = typer.Option("paper", help="Config preset: paper (the paper's values) or tiny (CPU)."),
    set_: list[str] = typer.Option(None, "--set", help="Fix a config field for every trial: key=value (repeatable)."),
    data_option: list[str] = typer.Option(None, "--data-option", help="Input option (key=value), as for train."),
    samples: int = typer.Option(None, help="Space: trials to sample (8). Ablation: seeds per setting (1)."),
    scheduler: str = typer.Option(
        None, help="asha (stop weak trials early) or fifo (every trial to the end); default asha, fifo for --ablation."
    ),
    metric: str = typer.Option("val_auroc", help="Metric to rank trials (val_auroc, val_ap, val_loss, sensitivity)."),
    mode: str = typer.Option("max", help="max or min."),
    grace_period: int = typer.Option(1, help="ASHA: epochs every trial runs before it can be stopped."),
    reduction_factor: float = typer.Option(2.0, help="ASHA: 1 / fraction of trials kept at each rung."),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial; fractions pack trials on one GPU."),
    cpus_per_trial: int = typer.Option(1, help="CPUs of each trial's Train worker (its torch threads)."),
    workers_per_trial: int = typer.Option(1, help="Ray Train workers per trial."),
    max_concurrent: int = typer.Option(None, help="Trials at once (default: what the cluster fits)."),
    out: str = typer.Option(
        None, help="Sweep folder or s3://bucket/prefix (default runs/tune-<method>-<ablation|space>)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out; its settings come from there."),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="Turn Weights & Biases logging off."),
    seed: int = typer.Option(0, help="Seed of the space sampling."),
    aux_data: str = typer.Option(
        None, "--aux-data", help="Shard folder of auxiliary images for the trials that train on them "
        "(dino_negatives with neg_source=aux or both, e.g. its ablation `negatives`)."
    ),
) -> None:
    """Sweep a method's search space or one of its ablations with Ray Tune (one Ray Train run per trial)."""
    from rich.console import Console

    from medood.platform.cli import _data_options, parse_assignments

    console = Console()
    if not resume and (method is None or data is None):
        raise ValueError("--method and --data are required (a --resume takes them from the sweep folder)")
    if resume and out is None and method is None:
        raise ValueError("--resume needs the sweep folder: --out, or the --method and --ablation that named it")
    options = SweepOptions(
        method=method or "",
        data=str(data or ""),
        space=space,
        ablation=ablation,
        preset=preset,
        overrides=parse_assignments(set_),
        data_options=_data_options(data_option),
        samples=samples,
        scheduler=scheduler,
        metric=metric,
        mode=mode,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        workers_per_trial=workers_per_trial,
        max_concurrent=max_concurrent,
        out=None if out is None else str(out),
        resume=resume,
        wandb=not no_wandb,
        seed=seed,
        aux_data=aux_data,
    )
    result = sweep(options)
    folder = storage.location(result.path)
    typer.echo((folder / RESULTS_MD).read_text())
    console.print(f"[green]sweep[/green] {folder}  ({result.trial_epochs} trial-epochs)")
    for skipped in result.skipped:
        console.print(f"[yellow]not run[/yellow] {skipped['label']}: {skipped['reason']}")
    if result.best is not None:
        console.print(f"best: {result.best['trial']} {result.metric}={result.best['metrics'][result.metric]:.4f}")
        console.print(f"best checkpoint: {result.best['checkpoint']}  ({folder / ckpt.BEST_FILE})")
    if result.interrupted:
        console.print(f"[yellow]interrupted[/yellow]: resume with `medood tune --resume --out {folder}`")
        raise typer.Exit(130)


# -- helpers ------------------------------------------------------------------------------------


def _trainable(plan: dict[str, Any]) -> Any:
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), _driver_resources())


def _driver_resources() -> dict[str, float]:
    return {"CPU": 0.0, "memory": float(DRIVER_MEMORY_BYTES)}


def _bundle(resources: dict[str, Any]) -> dict[str, float]:
    """A bundle as Ray stores it: upper-case resource names, zero amounts left out."""
    return {k.upper() if k in ("cpu", "gpu") else k: float(v) for k, v in resources.items() if v}


def _make_tuner(plan: dict[str, Any], out: storage.Location) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if plan["scheduler"] == "asha":
        # time_attr = epoch (not training_iteration): a resumed trial's Train run goes on at its next
        # epoch while Tune's iteration count restarts. stop_last_trials=False: a run that reaches
        # max_t ends by itself, so it writes its run.json.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=int(plan["max_t"]),
            grace_period=int(plan["grace_period"]),
            reduction_factor=float(plan["reduction_factor"]),
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(plan),
        param_space=param_space(plan),
        tune_config=tune.TuneConfig(
            metric=plan["metric"],
            mode=plan["mode"],
            scheduler=scheduler,
            # The generator itself limits concurrency: Tune ignores max_concurrent_trials when given one.
            search_alg=BasicVariantGenerator(random_state=int(plan["seed"]), max_concurrent=int(plan["max_concurrent"])),
            num_samples=int(plan["num_samples"]),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=out.name,
            storage_path=out.parent.path,
            storage_filesystem=out.ray_filesystem,
            failure_config=tune.FailureConfig(max_failures=0),  # each Train run retries its own workers
            # Tune's own status table every 30 s is replaced by one line per trial epoch (_trial_progress).
            verbose=0,
            callbacks=[_trial_progress()],
        ),
    )


def _trial_progress() -> Any:
    """A Tune callback: one line per trial epoch (``progress.progress_line``), and one when a trial ends."""
    from ray import tune

    from medood.platform.progress import progress_line

    class TrialProgress(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "epoch" in result:
                print(f"[{trial_name(trial)}] {progress_line(result)}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"[{trial_name(trial)}] done", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"[{trial_name(trial)}] failed; see results.md", flush=True)

    return TrialProgress()


def trial_name(trial: Any) -> str:
    """``<trial id>-<setting>``: readable, unique, safe as a folder name."""
    label = trial.config.get("setting")
    suffix = f"-{_slug(str(label))}" if label else ""
    if "seed" in trial.config and label:
        suffix += f"-seed{trial.config['seed']}"
    return f"{trial.trial_id}{suffix}"[:80]


def _setting(plan: dict[str, Any], label: str) -> dict[str, Any]:
    for setting in plan["ablation"]["settings"]:
        if setting["label"] == label:
            return setting
    known = ", ".join(s["label"] for s in plan["ablation"]["settings"])
    raise ValueError(f"unknown setting {label!r} of ablation {plan['ablation']['name']!r}; known: {known}")


def _resolved(plan: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The trial's config values (preset, then overrides), or just its overrides if they do not build."""
    overrides = trial_overrides(plan, config)
    try:
        return asdict(methods.get(plan["method"]).make_config(plan["preset"], overrides))
    except ValueError:
        return overrides


def _mean_std(values: list[Any], seeds: int) -> str:
    numbers = [float(v) for v in values if _number(v) is not None]
    if not numbers:
        return "–"
    if seeds > 1 and len(numbers) > 1:
        return f"{statistics.fmean(numbers):.3f} ± {statistics.stdev(numbers):.3f}"
    return f"{statistics.fmean(numbers):.3f}"


def _fmt(value: Any) -> str:
    return "–" if _number(value) is None else f"{float(value):.4f}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return spaces.format_value(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text).strip("_") or "trial"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_json(path: storage.Location, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))  # atomic (storage.Location.write_bytes)
