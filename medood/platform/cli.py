"""The `medood` command: ingest, data, train, evaluate, methods, tune, serve, demo.

Usage errors (an unknown method, config key, layout or split; a missing file) print one line that
names the bad value and the valid ones, and exit with code 2, as does a Ray cluster that cannot be
reached. The commands that start Ray (train, evaluate, tune, serve, demo) take ``--address``: the
cluster to join (default: ``RAY_ADDRESS``, else a new local Ray; see ``medood.platform.jobs``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from medood.platform.data.cli import data_app, ingest_command

app = typer.Typer(
    name="medood",
    help="Self-supervised anomaly detection in medical images, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)



def with_address(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with an ``--address`` option: the Ray cluster it joins (``jobs.use_address``)."""
    from medood.platform.jobs import ADDRESS_HELP, use_address

    @functools.wraps(command)
    def wrapper(*args: Any, address: str | None = None, **kwargs: Any) -> Any:
        use_address(address)
        return command(*args, **kwargs)

    signature = inspect.signature(command, eval_str=True)
    option = inspect.Parameter(
        "address", inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, "--address", help=ADDRESS_HELP), annotation=str
    )
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**command.__annotations__, "address": str}
    return wrapper


app.command("ingest", help="Ingest scans in a public layout into Parquet shards.")(ingest_command)
app.add_typer(data_app, name="data", help="Embedded datasets and shard information.")


def parse_assignments(items: list[str] | None, what: str = "--set") -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; values stay strings (the config parses them)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _data_options(items: list[str] | None) -> dict[str, Any]:
    import yaml

    return {k: yaml.safe_load(v) for k, v in parse_assignments(items, "--data-option").items()}


@app.command("train")
@with_address
def train_command(
    method: str = typer.Option(..., "--method", "-m", help="Registered method name (see `medood methods`)."),
    data: str = typer.Option(..., "--data", "-d", help="Shard folder (or s3://bucket/prefix) written by `medood ingest`."),
    preset: str = typer.Option("paper", help="Config preset: paper (the paper's values) or tiny (CPU)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config field: key=value (repeatable)."),
    data_option: list[str] = typer.Option(
        None, "--data-option", help="Input option: slice_axis, patch_size, min_foreground, ... (key=value)."
    ),
    workers: int = typer.Option(1, help="Ray Train workers."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs per worker (its torch threads: the integer part, at least 1)."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per worker; > 0 trains on GPU with bf16 autocast."),
    metric: str = typer.Option("val_auroc", help="Checkpoint metric (val_auroc, val_ap, val_loss)."),
    mode: str = typer.Option("max", help="max or min."),
    out: str = typer.Option(
        None, help="Run folder or s3://bucket/prefix (default runs/<method>); an existing run resumes."
    ),
    max_failures: int = typer.Option(1, help="Worker restarts from the latest checkpoint."),
    no_wandb: bool = typer.Option(False, "--no-wandb", help="Turn Weights & Biases logging off."),
    threshold_rule: str = typer.Option(
        "youden", help="How the val split sets the decision threshold: youden, specificity (95% on normals) or f1."
    ),
    placement: str = typer.Option(
        "PACK", "--placement", help="Where the workers go: PACK (few nodes), SPREAD, STRICT_SPREAD (one per node)."
    ),
    sync_batchnorm: bool = typer.Option(
        False, "--sync-batchnorm", help="Batch-norm statistics over all workers (SyncBatchNorm; GPU workers)."
    ),
    aux_data: str = typer.Option(
        None, "--aux-data", help="Shard folder of auxiliary images (its train split), for methods that train on "
        "them, e.g. dino_negatives with neg_source=aux or both."
    ),
) -> None:
    """Train a method with Ray Train on streamed shards; resumes when the run folder exists."""
    from medood import methods
    from medood.platform.jobs import ensure_ray
    from medood.platform.train import TrainOptions, auxiliary_data, train

    options = TrainOptions(
        method=method,
        data=str(data),
        out=str(out or Path("runs") / method),
        preset=preset,
        overrides=parse_assignments(set_),
        data_options=_data_options(data_option),
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        metric=metric,
        mode=mode,
        max_failures=max_failures,
        wandb=not no_wandb,
        threshold_rule=threshold_rule,
        placement_strategy=placement.upper(),
        sync_batchnorm=sync_batchnorm,
        aux_data=aux_data,
    )
    config = options.resolved_config()  # fail fast on unknown method / keys, before Ray starts
    if aux_data and not methods.get(method).uses_auxiliary_images(config):
        raise ValueError(f"--aux-data: {method} with these settings trains on no auxiliary images "
                         "(dino_negatives reads them with neg_source=aux or both)")
    auxiliary_data(options, config)
    if options.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"unknown placement {placement!r}; known: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
    ensure_ray()
    result = train(options)
    console.print(f"[green]run[/green] {result.path}")
    console.print(f"best checkpoint ({result.metric}, {result.mode}): {result.best_checkpoint}")
    _print_metrics(result.best_metrics)


@app.command("evaluate")
@with_address
def evaluate_command(
    checkpoint: str = typer.Argument(
        ..., help="A checkpoint folder, a run folder, or a sweep's best.json (local or s3://...)."
    ),
    data: str = typer.Option(..., "--data", "-d", help="Shard folder (or s3://bucket/prefix)."),
    split: str = typer.Option("test", help="Split to evaluate (train, val, test)."),
    out: str = typer.Option("runs/eval", help="Folder (or s3://bucket/prefix) for report.md, metrics.json and plots."),
    mood: str = typer.Option(None, "--mood", help="Also write the MOOD submission layout here (local or s3://...)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% intervals."),
    threshold_rule: str = typer.Option(
        None, help="Re-choose the threshold on the val split by this rule (youden, specificity, f1); default: the checkpoint's."
    ),
) -> None:
    """Evaluate a checkpoint: sample and pixel metrics, MOOD submission, report with plots."""
    from medood.platform import storage
    from medood.platform.evaluate import evaluate

    results = evaluate(
        checkpoint, data, split=split, out=out, mood_dir=mood, n_bootstrap=bootstrap, threshold_rule=threshold_rule
    )
    console.print(f"[green]report[/green] {storage.location(out) / 'report.md'}")
    _print_metrics({f"sample_{k}": v for k, v in results["sample"].items() if isinstance(v, float)})


@app.command("methods")
def methods_command(
    name: str = typer.Argument(None, help="Show one method's config fields."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the registered methods with their config fields, paper defaults and tiny values."""
    from medood import methods

    names = [name] if name else methods.names()
    described = {}
    for method_name in names:
        cls = methods.get(method_name)
        paper = cls.make_config("paper")
        tiny = cls.make_config("tiny") if "tiny" in cls.presets else None
        described[method_name] = {
            "doc": (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0],
            "presets": sorted(cls.presets),
            "fields": {
                f.name: {"paper": getattr(paper, f.name), "tiny": None if tiny is None else getattr(tiny, f.name)}
                for f in dataclasses.fields(paper)
            },
        }
    if as_json:
        console.print_json(json.dumps(described, default=str))
        return
    for method_name, info in described.items():
        table = Table(title=f"{method_name}: {info['doc']}", title_justify="left")
        table.add_column("field")
        table.add_column("paper")
        table.add_column("tiny")
        for field_name, values in info["fields"].items():
            table.add_row(field_name, str(values["paper"]), str(values["tiny"]))
        console.print(table)
        console.print(f"presets: {', '.join(info['presets'])}\n")


@app.command("demo")
@with_address
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), help="Where the data, runs and report go."),
    seed: int = typer.Option(0, help="Seed of the generated data and the runs."),
) -> None:
    """Generate both embedded datasets, ingest, train, evaluate, and write <out>/report.md."""
    from medood.platform.demo import run_demo

    report = run_demo(out, seed=seed, console=console)
    console.print(f"\n[bold green]Demo report:[/bold green] {report}")


def _register_sweep_and_serve_commands() -> None:
    """`medood tune` and `medood serve` (their modules import Ray Tune / Serve only when a command runs)."""
    from medood.platform import serve, tune

    if any(c.name == "tune" for c in app.registered_commands):  # main() ran before in this process
        return
    app.command("tune", help=tune.tune_command.__doc__)(with_address(tune.tune_command))
    app.command("serve", help=serve.serve_command.__doc__)(with_address(serve.serve_command))


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    _register_sweep_and_serve_commands()
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as error:
        err.print(f"[red]error:[/red] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
