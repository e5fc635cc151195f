"""The Ray Train trainable that runs any registered method on streamed shards.

``train(...)`` builds a ``TorchTrainer`` for (method, shards, config, scaling) and returns a
``RunResult``. Each worker streams its part of the train split (``ray.train.get_dataset_shard``),
runs the method's stages in order and reports every epoch; every ``val_every`` epochs rank 0

1. runs the method's ``fit_reference`` on the normal training data (``fit_reference`` below),
2. validates (``validate``; never changes the model: eval mode, no gradients, the RNGs restored):
   fits the score calibration on normal training data (mean / std of raw sample and map scores),
   scores the val split: ``val_auroc`` and ``val_ap`` when it holds both labels, the threshold by
   ``TrainOptions.threshold_rule`` (``metrics.choose_threshold``), and ``val_loss`` (the training
   loss, computed in eval mode, on val cases that are not known anomalies),

then reports the metrics with a checkpoint (``medood.platform.checkpoint`` format). Ray keeps the
best checkpoints by the chosen metric and always the latest. Starting a run again with the same
``out`` folder resumes from its latest checkpoint (Ray Train restores the run's state from
storage); ``max_failures`` restarts failed workers from the latest checkpoint too.

Multi-worker runs synchronise gradients with PyTorch DDP, set up by Ray Train's ``prepare_model``,
once per optimizer (``prepare_optimizers``): the parameters an optimizer steps are wrapped as one
DDP module whose forward passes that optimizer's loss through, so DDP's reducer is armed for exactly
the backward of that loss and all-reduces its buckets while the backward runs. Wrapping the whole
method would not do: methods with several optimizers (SQUID's generator / discriminator)
back-propagate each loss into a subset of the parameters (``backward(inputs=...)``), with several
backward passes per forward, which one DDP reducer over all parameters does not allow.
``find_unused_parameters`` covers parameters a loss does not reach in a step. All parameters and
buffers start from rank 0's (``broadcast_state``). ``TrainOptions.sync_batchnorm`` converts the
method's batch norms to ``SyncBatchNorm`` (batch statistics over all workers; GPU only, a PyTorch
limit).

A method without training stages (the reference floors) is fitted, validated and checkpointed once.

Progress: one line per epoch on the driver (``epoch 3/12  loss 0.041  val_auroc 0.870  4.1 s/epoch
eta 37 s``), sent by a Ray Train callback on the controller from what the workers report, through a
Ray queue, so it works the same on a cluster.

``train`` can be called as it is inside a Ray Tune function trainable: pass Tune's
``TuneReportCallback`` in ``callbacks``, the trial folder as ``out`` and ``progress=False``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medood import methods
from medood.platform import checkpoint as ckpt
from medood.platform import metrics as M
from medood.platform import storage
from medood.platform.data.stream import (
    MATERIALIZE_FRACTION,
    InputSpec,
    augment_batch,
    read_manifest,
    to_torch_batch,
    training_datasets,
)
from medood.platform.progress import ProgressPrinter

LABEL_FREE_METRICS = ("val_loss", "val_sensitivity")
#: A single worker keeps its preprocessed train split in memory up to this size (``_TrainingEpochs``).
WORKER_CACHE_BYTES = 2 * 1024**3
METRIC_ALIASES = {"sensitivity": "val_sensitivity"}


@dataclass
class TrainOptions:
    """Everything a run needs besides the method's own config. Mirrors ``medood train``'s flags."""

    method: str
    data: str
    out: str = "runs/run"
    preset: str | None = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    metric: str = "val_auroc"
    mode: str = "max"
    val_every: int = 1
    num_to_keep: int = 2
    max_failures: int = 1
    calibration_samples: int = 512
    mixed_precision: bool | None = None  # None: on when training on GPU (bf16 autocast)
    wandb: bool = True
    wandb_project: str = "medood"
    wandb_group: str | None = None
    shuffle_buffer: int = 64
    threshold_rule: str = "youden"  # metrics.THRESHOLD_RULES
    sync_batchnorm: bool = False  # multi-worker GPU runs: batch-norm statistics over all workers
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD (one per node)
    progress: bool = True  # one line per epoch on the driver
    # The share of Ray's object store this run may fill with its preprocessed splits (of the half that
    # runs materialize into); runs at once on one cluster (a sweep's trials) each get their part.
    store_share: float = 1.0
    # Shard folder of an auxiliary image set for methods whose training reads batch["aux_image"]
    # (``uses_auxiliary_images``, e.g. dino_negatives' negatives from another data set): its train split.
    aux_data: str | None = None

    def resolved_config(self) -> Any:
        return methods.get(self.method).make_config(self.preset, self.overrides)


@dataclass
class RunResult:
    path: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    metric: str
    mode: str
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(options: TrainOptions, *, callbacks: list | None = None) -> RunResult:
    """Train ``options.method`` on ``options.data`` with Ray Train; resumes an existing run folder."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = options.resolved_config()
    if options.threshold_rule not in M.THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {options.threshold_rule!r}; known: {', '.join(M.THRESHOLD_RULES)}")
    if not 0.0 < options.store_share <= 1.0:
        raise ValueError(f"store_share must be in (0, 1], got {options.store_share}")
    spec = InputSpec.from_config(config, **options.data_options)
    manifest = read_manifest(options.data)
    metric, mode = _effective_metric(options, manifest)
    aux_data = auxiliary_data(options, config)

    out = storage.location(options.out)  # a local folder or s3://bucket/prefix
    out.makedirs()
    if not ray.is_initialized():
        from medood.platform.jobs import ensure_ray

        ensure_ray()
    # Decoded, scaled, sliced and resized once per run (kept in the object store when it fits, else
    # streamed every epoch); the workers draw the random part (3D patches) per batch, every epoch.
    datasets, materialized = training_datasets(
        options.data, spec, batch_size=4,
        with_val=bool(int(manifest["counts"].get("val", {}).get("total", 0))),
        budget_fraction=MATERIALIZE_FRACTION * options.store_share,
    )
    if not methods.get(options.method).trainable:
        # Fitted on ``reference`` alone: no training split to hand out.
        del datasets["train"]
    if aux_data:
        # Preprocessed like the training images (same size, channels, intensity scaling); not split over
        # the workers: each draws its own random auxiliary images, cycling through the set.
        datasets["aux"] = training_datasets(aux_data, spec, batch_size=4, with_val=False)[0]["reference"]
    # The train split is split over the workers (``streaming_split``: a SplitCoordinator actor runs the
    # pipeline and hands each worker its blocks, every epoch). One worker gets the whole split anyway, so
    # it iterates the dataset itself: the same blocks in the same order, without that actor's start
    # (seconds on a small machine) and without a round trip to it for every block of every epoch.
    split = ["train"] if options.workers > 1 and "train" in datasets else []

    use_gpu = options.gpus_per_worker > 0
    loop_config = {
        "method": options.method,
        "config": asdict(config),
        "spec": spec.to_dict(),
        "val_every": max(1, int(options.val_every)),
        "calibration_samples": int(options.calibration_samples),
        "mixed_precision": use_gpu if options.mixed_precision is None else bool(options.mixed_precision),
        "cpus_per_worker": float(options.cpus_per_worker),
        "shuffle_buffer": int(options.shuffle_buffer),
        # one worker keeps a materialized train split in its memory (``_TrainingEpochs``); a streamed one
        # did not fit in the object store, so it stays streamed
        "cache_train": options.workers == 1 and "train" in materialized,
        "threshold_rule": options.threshold_rule,
        "metric": metric,
        "mode": mode,
        "sync_batchnorm": bool(options.sync_batchnorm),
        "run_name": out.name,
        "wandb": _wandb_settings(options, out, config),
    }
    resources = {"CPU": float(options.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(options.gpus_per_worker)
    printer = ProgressPrinter(out.name) if options.progress else None
    callbacks = list(callbacks or []) + ([printer.callback] if printer else [])
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=options.placement_strategy,
        ),
        run_config=RunConfig(
            name=out.name,
            storage_path=out.parent.path,
            storage_filesystem=out.ray_filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=options.num_to_keep, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order=mode
            ),
            failure_config=FailureConfig(max_failures=options.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        # Blocks reach the worker in the same order every run, so the seeded shuffle is reproducible.
        dataset_config=DataConfig(datasets_to_split=split, execution_options={"train": _ordered_ingest()}),
    )
    try:
        result = trainer.fit()
    finally:
        if printer:
            printer.close()
    return _write_run_file(out, options, config, spec, result, metric, mode)


# -- the loop each worker runs ------------------------------------------------------------------


def _train_loop_per_worker(loop: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from medood.platform.jobs import quiet_ray_data

    quiet_ray_data()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    method_cls = methods.get(loop["method"])
    config = method_cls.make_config(None, loop["config"])
    spec = _spec_from_dict(loop["spec"])
    _seed_everything(int(config.seed) + rank)
    model = method_cls(config).to(device)
    amp = bool(loop["mixed_precision"]) and device.type == "cuda"
    if loop.get("sync_batchnorm") and world > 1:
        if device.type == "cpu":
            raise ValueError("sync_batchnorm needs GPU workers (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    start = _restore(model, ray.train.get_checkpoint())
    broadcast_state(model, world)
    history: list[dict[str, Any]] = start["history"]
    tracker = _Tracker(loop["wandb"]) if rank == 0 else None

    train_shard = _maybe_shard("train")  # none for training-free methods
    train_batches = _TrainingEpochs(
        train_shard, spec, int(config.batch_size), device, seed=int(config.seed),
        shuffle_buffer=int(loop["shuffle_buffer"]), cache=bool(loop["cache_train"]),
    )
    aux_shard = _maybe_shard("aux")
    reference = ray.train.get_dataset_shard("reference") if rank == 0 else None
    val = _maybe_shard("val") if rank == 0 else None
    batch_size = int(config.batch_size)
    global_epoch = start["global_epoch"]
    stages = model.stages()
    total_epochs = sum(stage.epochs for stage in stages)

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Every rank reports every epoch; rank 0 adds val metrics and a checkpoint when ``state``."""
        if rank != 0 or state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        fit_reference(model, reference, device, batch_size)
        val_metrics, calibration = validate(
            model, reference, val, device, amp, batch_size, loop["calibration_samples"],
            stage=metrics["stage"] if total_epochs else None, threshold_rule=loop["threshold_rule"],
            # the same auxiliary images at every validation, so val_loss compares across epochs
            aux=_AuxiliaryImages(aux_shard, batch_size, device, seed=0) if aux_shard is not None else None,
        )
        metrics.update(val_metrics)
        if loop["metric"] in metrics:
            metrics[CHECKPOINT_SCORE] = checkpoint_score(
                metrics[loop["metric"]], loop["mode"], final=not stages or metrics["stage_index"] == len(stages) - 1
            )
        history.append(metrics)
        state["history"] = json.dumps(history)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save(tmp, model, calibration=calibration, input_spec=spec, metrics=metrics, training_state=state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if tracker:
            tracker.log(metrics, step=metrics["epoch"])

    try:
        if total_epochs == 0 and start["global_epoch"] == 0 and not history:
            # Training-free methods (e.g. the reference floors): fit on the normal training data, validate, checkpoint.
            metrics = {"epoch": 0, "epochs_total": 0, "stage": "fit", "stage_index": 0, "train_samples": 0}
            state = {"stage_index": 0, "epoch_in_stage": 0, "global_epoch": 0, "optimizers": {}, "schedulers": {}}
            report(metrics, state)
        for stage_index, stage in enumerate(stages):
            if stage_index < start["stage_index"]:
                continue
            optimizers = model.configure_optimizers(stage.name)
            schedulers = model.configure_schedulers(stage.name, optimizers)
            syncs = prepare_optimizers(optimizers, world_size=world)
            first_epoch = 0
            if stage_index == start["stage_index"]:
                first_epoch = start["epoch_in_stage"]
                for name, state in start["optimizers"].items():
                    if name in optimizers:
                        optimizers[name].load_state_dict(state)
                for name, state in start["schedulers"].items():
                    if name in schedulers:
                        schedulers[name].load_state_dict(state)
            if first_epoch == 0 and stage.epochs > 0:
                # Stage hook: statistics of the whole training split, gathered over the workers.
                begin_stage(model, stage.name, train_batches.epoch(global_epoch), world_size=world)
            for epoch in range(first_epoch, stage.epochs):
                _seed_everything(int(config.seed) + 1000 * global_epoch + rank)
                t0, cpu0 = time.perf_counter(), time.thread_time()
                model.train()
                sums: dict[str, float] = defaultdict(float)
                counts: dict[str, int] = defaultdict(int)
                samples = 0
                known_anomalies = 0
                data_wait = 0.0  # seconds this worker waited for its next batch (the data path's share)
                batches = train_batches.epoch(global_epoch)
                aux_images = (
                    _AuxiliaryImages(aux_shard, batch_size, device, seed=int(config.seed) + global_epoch)
                    if aux_shard is not None else None
                )
                while True:
                    t_wait = time.perf_counter()
                    tb = next(batches, None)
                    if tb is None:
                        break
                    if aux_images is not None:
                        tb["aux_image"] = aux_images.take(len(tb["id"]))
                    data_wait += time.perf_counter() - t_wait
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        losses = model(tb, stage.name)
                    step_optimizers(optimizers, losses, syncs=syncs)
                    samples += len(tb["id"])
                    known_anomalies += int((tb["label"] == 1).sum())
                    for key, value in losses.items():
                        sums[key] += float(value.detach())
                        counts[key] += 1
                for scheduler in schedulers.values():
                    scheduler.step()
                end_epoch(model, stage.name, epoch, world_size=world)
                seen, labelled = _sum_over_workers([samples, known_anomalies], world, device)
                global_epoch += 1
                epoch_in_stage = epoch + 1
                last_of_stage = epoch_in_stage == stage.epochs
                metrics: dict[str, Any] = {
                    "epoch": global_epoch,
                    "epochs_total": total_epochs,
                    "stage": stage.name,
                    "stage_index": stage_index,
                    "train_samples": samples,
                    "epoch_time_s": time.perf_counter() - t0,
                    "epoch_data_wait_s": data_wait,
                    # CPU seconds of the training thread: below epoch_time_s when it waited for a core or for data.
                    "epoch_cpu_s": time.thread_time() - cpu0,
                    "resumed_from_epoch": start.get("resumed_from_epoch", 0),
                    # Semi-supervised runs: the known (labelled) anomalies in train, over all workers.
                    "train_labelled_fraction": labelled / max(seen, 1),
                    **{f"train_{k}": sums[k] / counts[k] for k in sums},
                }
                if not (last_of_stage or epoch_in_stage % loop["val_every"] == 0):
                    report(metrics, None)
                    continue
                state = {
                    "stage_index": stage_index if not last_of_stage else stage_index + 1,
                    "epoch_in_stage": epoch_in_stage if not last_of_stage else 0,
                    "global_epoch": global_epoch,
                    "optimizers": {n: o.state_dict() for n, o in optimizers.items()} if not last_of_stage else {},
                    "schedulers": {n: sc.state_dict() for n, sc in schedulers.items()} if not last_of_stage else {},
                }
                report(metrics, state)
    finally:
        if tracker:
            tracker.finish()


class OptimizerParams(torch.nn.Module):
    """The parameters one optimizer steps, as a module DDP can wrap; its forward passes a loss through."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)  # the method's own Parameter objects, shared

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _ray_prepare(module: torch.nn.Module) -> torch.nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(
        module, move_to_device=False, parallel_strategy="ddp", parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def prepare_optimizers(
    optimizers: dict[str, torch.optim.Optimizer], *, world_size: int, wrap: Any = None
) -> dict[str, torch.nn.Module]:
    """One DDP module per optimizer (``OptimizerParams`` through ``wrap``, Ray Train's ``prepare_model``).

    Empty for a single worker. ``step_optimizers`` passes optimizer ``k``'s loss through module ``k``
    right before its backward, which arms DDP's reducer for that backward only: the reducer's
    gradient hooks all-reduce (average) the gradients bucket by bucket while the backward runs and
    write them back before ``backward`` returns. ``wrap`` is for tests without Ray Train:
    ``lambda m: DistributedDataParallel(m, find_unused_parameters=True)``.
    """
    if world_size <= 1:
        return {}
    wrap = wrap or _ray_prepare
    syncs = {}
    for name, optimizer in optimizers.items():
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if params:
            syncs[name] = wrap(OptimizerParams(params))
    return syncs


def broadcast_state(model: torch.nn.Module, world_size: int) -> None:
    """Every rank starts from rank 0's parameters and buffers (ranks seed their RNGs differently)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def step_optimizers(
    optimizers: dict[str, torch.optim.Optimizer],
    losses: dict[str, torch.Tensor],
    *,
    syncs: dict[str, torch.nn.Module] | None = None,
) -> None:
    """One optimisation step under the method contract (see ``medood.methods.base``).

    Optimizer ``main`` minimises ``loss``, optimizer ``k`` minimises ``loss_k``; a loss that is absent
    skips its optimizer. Each loss is back-propagated only into its optimizer's parameters; with
    several workers its gradients are averaged over the workers by DDP during that backward
    (``syncs`` from ``prepare_optimizers``).
    """
    syncs = syncs or {}
    active = []
    for name, optimizer in optimizers.items():
        key = "loss" if name == "main" else f"loss_{name}"
        if key in losses:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            active.append((name, optimizer, losses[key], params))
    if not active:
        return
    for _, optimizer, _, _ in active:
        optimizer.zero_grad(set_to_none=True)
    for i, (name, _, loss, params) in enumerate(active):
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({float(loss)}); lower the learning rate")
        if name in syncs:
            loss = syncs[name](loss)  # arms DDP's reducer for this backward
        loss.backward(inputs=params, retain_graph=i < len(active) - 1)
    for _, optimizer, _, _ in active:
        optimizer.step()


def begin_stage(model: methods.AnomalyMethod, stage: str, batches: Iterator[dict[str, Any]], *, world_size: int = 1) -> None:
    """The stage-start hook on every worker: ``stage_statistics`` (eval mode, no gradients, RNGs
    restored) on this worker's batches, every tensor concatenated over the workers in rank order,
    then ``begin_stage`` with the same gathered tensors on every rank."""
    with _evaluating(model):
        local = model.stage_statistics(stage, batches)
    gathered = {key: all_gather_rows(local[key], world_size) for key in sorted(local)}
    model.begin_stage(stage, gathered)


def end_epoch(model: methods.AnomalyMethod, stage: str, epoch: int, *, world_size: int = 1) -> None:
    """The end-of-epoch hook on every worker: ``epoch_statistics`` summed over the workers, then ``end_epoch``."""
    local = model.epoch_statistics(stage)
    summed = {}
    for key in sorted(local):
        value = local[key].detach().clone()
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        summed[key] = value
    model.end_epoch(stage, epoch, summed)


def all_gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """``tensor`` from every worker concatenated along dim 0 in rank order (row counts may differ)."""
    if world_size <= 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.detach().contiguous()
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world_size)]
    dist.all_gather(all_rows, rows)
    counts = [int(r) for r in all_rows]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _sum_over_workers(values: list[int], world_size: int, device: torch.device) -> list[int]:
    if world_size <= 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return [int(v) for v in total]


@contextmanager
def _evaluating(model: methods.AnomalyMethod) -> Iterator[None]:
    """Eval mode, no gradients, and every RNG (torch, NumPy, random) restored afterwards.

    Together with the method contract (``training_step`` in eval mode writes no queue, counter or
    buffer) this is what makes validation, calibration and scoring leave a model exactly as it was.
    """
    was_training = model.training
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        model.train(was_training)


def fit_reference(model: methods.AnomalyMethod, reference: Any, device: torch.device, batch_size: int) -> None:
    """The method's ``fit_reference`` on the normal training cases (known anomalies left out), in eval mode."""
    def normal_batches() -> Iterator[dict[str, Any]]:
        for tb in _torch_batches(reference, batch_size, device):
            normal = tb["label"] != 1
            if bool(normal.all()):
                yield tb
            elif bool(normal.any()):
                yield _subset(tb, normal)

    with _evaluating(model):
        model.fit_reference(normal_batches())


def validate(
    model: methods.AnomalyMethod,
    reference: Any,
    val: Any,
    device: torch.device,
    amp: bool,
    batch_size: int,
    calibration_samples: int,
    *,
    stage: str | None = None,
    threshold_rule: str = "youden",
    aux: _AuxiliaryImages | None = None,
) -> tuple[dict[str, float], ckpt.Calibration]:
    """Calibration on normal training data, then val metrics; leaves the model exactly as it was.

    ``val_loss`` is ``training_step`` on the val cases that are not known anomalies, computed in eval
    mode (methods must not write state there; see ``medood.methods.base``); ``stage=None`` skips it.
    Methods that train on auxiliary images get them from ``aux`` for that loss too.
    """
    with _evaluating(model):
        raw, map_values, seen = [], [], 0
        rng = np.random.default_rng(0)
        for tb in _torch_batches(reference, batch_size, device):
            normal = tb["label"] != 1
            if not bool(normal.any()):
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                scores = model.score(tb)
            raw.append(scores.sample[normal].float().cpu().numpy())
            if scores.map is not None:
                values = scores.map[normal].float().cpu().numpy().reshape(-1)
                map_values.append(rng.choice(values, size=min(values.size, 20000), replace=False))
            seen += int(normal.sum())
            if seen >= calibration_samples:
                break
        if not raw:
            raise ValueError("the train split holds no normal cases to calibrate the scores on")
        normal_raw = np.concatenate(raw)
        calibration = ckpt.Calibration.fit(normal_raw, np.concatenate(map_values) if map_values else None)
        metrics: dict[str, float] = {}
        if val is None:
            # No val split: the score at the target specificity on the normal training cases (optimistic).
            threshold, rule = M.choose_threshold(np.zeros(len(normal_raw)), calibration.sample(normal_raw), "specificity")
            calibration.threshold, calibration.threshold_rule = threshold, rule.replace("normal cases", "normal training cases")
            return metrics, calibration
        labels, val_raw, losses = [], [], []
        sensitivity_reference = getattr(model, "sensitivity_reference", lambda: None)()
        sensitivity_values = []
        for tb in _torch_batches(val, batch_size, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                scores = model.score(tb)
                known_normal = tb["label"] != 1
                if stage is not None and bool(known_normal.any()):
                    normals = _subset(tb, known_normal)
                    if aux is not None:
                        normals["aux_image"] = aux.take(len(normals["id"]))
                    step_losses = model.training_step(normals, stage)
                    if "loss" in step_losses:
                        losses.append(float(step_losses["loss"]))
            labels.append(tb["label"].cpu().numpy())
            val_raw.append(scores.sample.float().cpu().numpy())
            if sensitivity_reference is not None and bool((tb["label"] == 0).any()):
                # D_test^in of the label-free sensitivity score: the known-normal val cases (thesis Sec. 6.1.5)
                sensitivity_values.append(model.sensitivity_scores(_subset(tb, tb["label"] == 0)).float().cpu().numpy())
        if losses:
            metrics["val_loss"] = float(np.mean(losses))
        if sensitivity_values:
            metrics["val_sensitivity"] = M.label_free_sensitivity(
                sensitivity_reference.float().cpu().numpy(), np.concatenate(sensitivity_values)
            )
        if labels:
            y = np.concatenate(labels)
            s = calibration.sample(np.concatenate(val_raw))
            known = y >= 0
            if M.has_both_classes(y[known]):
                metrics["val_auroc"] = M.auroc(y[known], s[known])
                metrics["val_ap"] = M.average_precision(y[known], s[known])
            if known.any():
                calibration.threshold, calibration.threshold_rule = M.choose_threshold(y[known], s[known], threshold_rule)
                metrics["val_threshold"] = calibration.threshold
        return metrics, calibration



# -- helpers ------------------------------------------------------------------------------------


def _effective_metric(options: TrainOptions, manifest: dict[str, Any]) -> tuple[str, str]:
    """The checkpoint metric: the requested one, or ``val_loss`` when val has no labels to rank by.

    ``sensitivity`` names ``val_sensitivity``, the label-free score of the methods that define one (Rafiee
    thesis ch. 7), ranked by its maximum.
    """
    if options.metric in METRIC_ALIASES:
        options = dataclasses.replace(options, metric=METRIC_ALIASES[options.metric])
    val_counts = manifest["counts"].get("val", {})
    labelled = int(val_counts.get("normal", 0)) > 0 and int(val_counts.get("abnormal", 0)) > 0
    if options.metric in ("val_auroc", "val_ap") and not labelled:
        return "val_loss", "min"
    if options.mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {options.mode!r}")
    return options.metric, options.mode


def _ordered_ingest() -> Any:
    """The driver's Ray Data execution options (what Ray Train carries over by default) with ``preserve_order`` on."""
    import copy

    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def _torch_batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield to_torch_batch(batch, device)


class _TrainingEpochs:
    """The worker's training batches, epoch by epoch, as torch batches.

    The shard holds the deterministically preprocessed train split (materialized once per run when it
    fits; ``stream.training_datasets``). Epoch ``e``'s random part (3D patches) is drawn per case from
    ``(seed, e, case)`` (``augment_batch``): new patches every epoch, the same ones on a rerun.

    One worker (``cache``: its split was materialized, so it fits in half the object store) keeps the
    preprocessed rows of its first pass in memory while they stay under ``WORKER_CACHE_BYTES``, and later
    epochs shuffle them with a permutation drawn from ``(seed, e)`` and batch them without a Ray Data pass (issue 10: a pass pays an executor start, and every batch an
    Arrow -> numpy conversion). Several workers stream every epoch: Ray's ``streaming_split`` hands each
    epoch's blocks to all of them together, and a worker that stopped asking would stall the others.
    A pass through Ray Data shuffles within a ``shuffle_buffer`` of rows, seeded with ``seed + e``.
    """

    def __init__(
        self, shard: Any, spec: InputSpec, batch_size: int, device: torch.device, *, seed: int,
        shuffle_buffer: int, cache: bool,
    ) -> None:
        self.shard, self.spec, self.batch_size, self.device = shard, spec, batch_size, device
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.caching = cache  # still collecting the first pass's rows
        self.rows: dict[str, np.ndarray] | None = None  # the cached rows, once a whole pass fitted

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        if self.rows is not None:
            yield from self._cached(epoch)
            return
        kept: list[dict[str, np.ndarray]] = []
        size = 0
        for batch in self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=False,
            local_shuffle_buffer_size=self.shuffle_buffer or None, local_shuffle_seed=self.seed + epoch,
        ):
            if self.caching:
                size += sum(np.asarray(v).nbytes for v in batch.values())
                if size <= WORKER_CACHE_BYTES:
                    kept.append({k: np.array(v) for k, v in batch.items()})
                else:
                    self.caching, kept = False, []
            yield self._to_torch(batch, epoch)
        if self.caching and kept:
            self.rows = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
        self.caching = False

    def _cached(self, epoch: int) -> Iterator[dict[str, Any]]:
        rows = self.rows
        assert rows is not None
        order = np.random.default_rng([self.seed, epoch]).permutation(len(rows["id"]))
        for start in range(0, len(order), self.batch_size):
            picked = order[start : start + self.batch_size]
            yield self._to_torch({k: v[picked] for k, v in rows.items()}, epoch)

    def _to_torch(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, Any]:
        if "seed_key" in batch:  # the spec has a random part (stream.training_datasets keeps the key then)
            batch = augment_batch(batch, self.spec, seed=int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return to_torch_batch(batch, self.device)


class _AuxiliaryImages:
    """Auxiliary images, ``n`` at a time, in a seeded shuffled order, round and round the set."""

    def __init__(self, shard: Any, batch_size: int, device: torch.device, *, seed: int) -> None:
        self.shard, self.batch_size, self.device, self.seed = shard, batch_size, device, seed
        self.stream = self._stream()
        self.pending: torch.Tensor | None = None

    def _stream(self) -> Iterator[torch.Tensor]:
        passes = 0
        while True:
            found = False
            for batch in self.shard.iter_batches(
                batch_size=self.batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * self.batch_size,
                local_shuffle_seed=self.seed + passes,
            ):
                found = True
                yield to_torch_batch(batch, self.device)["image"]
            if not found:
                raise ValueError("the auxiliary shard folder's train split has no images")
            passes += 1

    def take(self, n: int) -> torch.Tensor:
        parts = [self.pending] if self.pending is not None else []
        while sum(len(p) for p in parts) < n:
            parts.append(next(self.stream))
        joined = torch.cat(parts)
        self.pending = joined[n:]
        return joined[:n]


def auxiliary_data(options: TrainOptions, config: Any) -> str | None:
    """``options.aux_data`` when the method's training reads auxiliary images; a clear error when they are
    needed and not named, or named and absent."""
    needed = methods.get(options.method).uses_auxiliary_images(config)
    if not needed:
        return None  # a sweep may name one for the trials that use it; the others ignore it
    if not options.aux_data:
        raise ValueError(
            f"{options.method} with these settings trains on auxiliary images (e.g. neg_source='aux' or 'both'): "
            "name their shard folder with --aux-data SHARDS (any data set ingested with `medood data ingest`), "
            "or use in-distribution negatives (--set neg_source=in_dist)"
        )
    counts = read_manifest(options.aux_data)["counts"]
    if not int(counts.get("train", {}).get("total", 0)):
        raise ValueError(f"--aux-data {options.aux_data}: its train split is empty (the auxiliary images are drawn from it)")
    return options.aux_data


def _subset(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    index = keep.nonzero().flatten().tolist()
    out = {}
    for key, value in batch.items():
        out[key] = value[keep] if isinstance(value, torch.Tensor) else [value[i] for i in index]
    return out


def _maybe_shard(name: str) -> Any:
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def _restore(model: methods.AnomalyMethod, checkpoint: Any) -> dict[str, Any]:
    start = {"stage_index": 0, "epoch_in_stage": 0, "global_epoch": 0, "optimizers": {}, "schedulers": {}, "history": []}
    if checkpoint is None:
        return start
    with checkpoint.as_directory() as directory:
        payload = ckpt.read_payload(Path(directory) / ckpt.MODEL_FILE)
    model.load_state_dict(payload["state_dict"])
    state = payload.get("training_state", {})
    start.update({k: state[k] for k in ("stage_index", "epoch_in_stage", "global_epoch", "optimizers", "schedulers") if k in state})
    start["history"] = json.loads(state.get("history", "[]"))
    start["resumed_from_epoch"] = start["global_epoch"]
    return start


def _spec_from_dict(values: dict[str, Any]) -> InputSpec:
    values = dict(values)
    values["intensity_percentiles"] = tuple(values["intensity_percentiles"])
    return InputSpec(**values)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _wandb_settings(options: TrainOptions, out: storage.Location, config: Any) -> dict[str, Any] | None:
    if not options.wandb:
        return None
    return {
        "project": options.wandb_project,
        "group": options.wandb_group,
        "name": out.name,
        "dir": str(storage.scratch_folder(out)),
        "config": {"method": options.method, "preset": options.preset, **asdict(config)},
    }


class _Tracker:
    """Weights & Biases logging on rank 0, offline unless the user chose a mode (WANDB_MODE).

    ``wandb.init`` (import, then starting W&B's service process: 3-10 s on a small machine) runs in a
    thread while the worker starts training; the first ``log`` waits for it.
    """

    def __init__(self, settings: dict[str, Any] | None) -> None:
        self.run = None
        self._error: BaseException | None = None
        self._starting: threading.Thread | None = None
        if settings is None:
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._starting = threading.Thread(target=self._init, args=(settings,), name="medood-wandb-init", daemon=True)
        self._starting.start()

    def _init(self, settings: dict[str, Any]) -> None:
        try:
            import wandb

            self.run = wandb.init(
                project=settings["project"],
                group=settings["group"],
                name=settings["name"],
                dir=settings["dir"],
                config=settings["config"],
                reinit="finish_previous",
            )
        except BaseException as error:  # noqa: BLE001 - raised again by the first log (or finish)
            self._error = error

    def _started(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._started()
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        self._started()
        if self.run is not None:
            self.run.finish()
            self.run = None


# What Ray Train ranks checkpoints by: the run's metric in the method's last stage, and the worst value
# in an earlier stage (a pretext or MAE-only model is not the method the user trains, whatever its
# val AUROC), so the best checkpoint and the ones kept are always from the last stage when it has one.
CHECKPOINT_SCORE = "checkpoint_score"


def checkpoint_score(value: float, mode: str, *, final: bool) -> float:
    if final:
        return float(value)
    return -1e30 if mode == "max" else 1e30


def _write_run_file(
    out: storage.Location, options: TrainOptions, config: Any, spec: InputSpec, result: Any, metric: str, mode: str
) -> RunResult:
    if result.error:
        raise result.error
    best = None
    best_metrics: dict[str, Any] = {}
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if CHECKPOINT_SCORE in m]
    if ranked:
        best, best_metrics = (max if mode == "max" else min)(ranked, key=lambda cm: cm[1][CHECKPOINT_SCORE])
    latest = result.checkpoint
    if best is None and latest is not None:
        best, best_metrics = latest, dict(result.metrics or {})
    history = []
    if latest is not None:
        with latest.as_directory() as directory:
            payload = ckpt.read_payload(Path(directory) / ckpt.MODEL_FILE)
        history = json.loads(payload.get("training_state", {}).get("history", "[]"))
    run = RunResult(  # checkpoint paths as users name them: local paths, or URIs on object storage
        path=out.uri,
        best_checkpoint=None if best is None else out.at(best.path).uri,
        latest_checkpoint=None if latest is None else out.at(latest.path).uri,
        metric=metric,
        mode=mode,
        best_metrics=_plain(best_metrics),
        history=[_plain(h) for h in history],
    )
    info = {
        "method": options.method,
        "preset": options.preset,
        "config": asdict(config),
        "data": storage.location(options.data).uri,
        "aux_data": storage.location(options.aux_data).uri if options.aux_data else None,
        "input_spec": spec.to_dict(),
        "checkpoint": run.best_checkpoint,
        **{k: v for k, v in run.to_dict().items() if k != "path"},
    }
    (out / ckpt.RUN_FILE).write_text(json.dumps(info, indent=2, default=str))
    return run


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
