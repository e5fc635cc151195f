"""The data commands of ``medood``: ``medood ingest`` and ``medood data info|synth``.

``medood/platform/cli.py`` mounts them with ``app.command("ingest")(ingest_command)`` and
``app.add_typer(data_app, name="data")``. Only usage errors (an unknown layout, a malformed
``--split`` or ``--option``, a missing source folder) exit with code 2, naming the bad value and
the allowed ones. Data errors never stop an ingest: each bad file is quarantined with a reason and
the ingest exits 0, or 1 with ``--strict`` when anything was quarantined. Input that is not one
file's fault (a label CSV listing a missing file, duplicate ids: ``IngestError``) exits with 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medood.platform.data.ingest import DEFAULT_MAX_SHARD_BYTES, MIB, IngestError, info, info_tables, ingest
from medood.platform.data.layouts import LAYOUTS, UsageError, get_layout
from medood.platform.data.readers import DEFAULT_MAX_VOXELS

data_app = typer.Typer(help="Inspect shards and generate the embedded data sets.", no_args_is_help=True)
_console = Console(soft_wrap=True)
_errors = Console(stderr=True, soft_wrap=True)


def ingest_command(
    src: Annotated[
        Path, typer.Argument(help="Folder holding the data set as released.", exists=True, file_okay=False)
    ],
    out: Annotated[
        str, typer.Argument(help="Folder (or s3://bucket/prefix) to write part-*.parquet and manifest.json to.")
    ],
    layout: Annotated[
        str, typer.Option("--layout", "-l", help=f"Folder structure of SRC: {', '.join(sorted(LAYOUTS))}.")
    ],
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit non-zero if any file was quarantined.")
    ] = False,
    train_anomalies: Annotated[
        float,
        typer.Option("--train-anomalies", help="Fraction of abnormal groups moved into train (0 to 1)."),
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the group-level split.")] = 0,
    split: Annotated[
        str, typer.Option("--split", help="train,val,test fractions summing to 1.")
    ] = "0.8,0.1,0.1",
    max_shard_mb: Annotated[
        float, typer.Option("--max-shard-mb", help="Upper bound of row data per shard, MiB.")
    ] = DEFAULT_MAX_SHARD_BYTES / MIB,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Layout option key=value (repeatable), e.g. modality=t2."),
    ] = None,
    salt: Annotated[
        str | None,
        typer.Option(
            "--salt", envvar="MEDOOD_SALT", help="Salt for patient hashes (default: ~/.medood/salt)."
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset name in rows (default: layout).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    max_voxels: Annotated[
        int,
        typer.Option(
            "--max-voxels",
            help="Largest image accepted, in voxels, checked on each file's header before decoding "
            "(the limit `medood serve` uses too); larger files are quarantined.",
        ),
    ] = DEFAULT_MAX_VOXELS,
) -> None:
    """Turn SRC (in a known layout) into Parquet shards and a manifest under OUT.

    Every image file ends in rows or in quarantine with a reason; a bad file never stops the others.
    """
    try:
        spec = get_layout(layout)
    except UsageError as error:
        raise typer.BadParameter(str(error), param_hint="--layout") from None
    options = parse_options(option or [], spec.options, layout)
    fractions = parse_split(split)
    if not 0.0 <= train_anomalies <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {train_anomalies}", param_hint="--train-anomalies")
    if max_shard_mb <= 0:
        raise typer.BadParameter(f"must be positive, got {max_shard_mb}", param_hint="--max-shard-mb")
    if max_voxels < 1:
        raise typer.BadParameter(f"must be positive, got {max_voxels}", param_hint="--max-voxels")
    try:
        report = ingest(
            layout,
            src,
            out,
            seed=seed,
            splits=fractions,
            train_anomalies=train_anomalies,
            strict=strict,
            max_shard_bytes=int(max_shard_mb * MIB),
            salt=salt,
            dataset=dataset,
            progress=progress,
            max_voxels=max_voxels,
            **options,
        )
    except IngestError as error:
        _errors.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None
    _console.print(report.summary(), markup=False, highlight=False)
    if report.failed:
        _errors.print(
            f"--strict: {len(report.quarantine)} file(s) quarantined (listed in {report.out / 'manifest.json'})",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)


@data_app.command("info")
def info_command(
    shards: Annotated[str, typer.Argument(help="Folder (or s3://bucket/prefix) written by `medood ingest`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Counts per split and label, shards and quarantine of a shards folder."""
    try:
        summary = info(shards)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="SHARDS") from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    for table in info_tables(summary):
        _console.print(table)
    if summary["missing_shards"]:
        _errors.print(f"missing shards: {', '.join(summary['missing_shards'])}", markup=False)
        raise typer.Exit(1)


@data_app.command("synth")
def synth_command(
    kind: Annotated[str, typer.Argument(help="Embedded data set: synthetic-brain or digitanatomy.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the data set to (in its layout).")],
    n_train: Annotated[int | None, typer.Option("--n-train", help="Normal training cases.")] = None,
    n_test: Annotated[int | None, typer.Option("--n-test", help="Test cases (normal and abnormal).")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Side of the image or volume, pixels.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed.")] = 0,
    shards: Annotated[
        str | None,
        typer.Option("--shards", help="Also ingest the result into this shards folder (or s3://bucket/prefix)."),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Generate an embedded data set, and with --shards ingest it straight away."""
    from medood.platform.data.synthetic import synthesize

    sizes = {"n_train": n_train, "n_test": n_test, "size": size}
    try:
        layout = synthesize(
            kind, out, **{k: v for k, v in sizes.items() if v is not None}, seed=seed, progress=progress
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    _console.print(f"wrote {kind} to {out} (layout {layout})", markup=False, highlight=False)
    if shards is None:
        return
    try:
        report = ingest(layout, out, shards, seed=seed, dataset=kind, progress=progress)
    except IngestError as error:
        _errors.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    _console.print(report.summary(), markup=False, highlight=False)


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); ``typer.BadParameter`` naming the value otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise typer.BadParameter(
            f"{text!r} is not three non-negative train,val,test fractions summing to 1 (e.g. 0.8,0.1,0.1)",
            param_hint="--split",
        )
    return values  # type: ignore[return-value]


def parse_options(items: list[str], known: dict[str, Any], layout: str) -> dict[str, Any]:
    """``["modality=t2", "drop_not_normal=true"]`` -> typed options, checked against the layout's."""
    options: dict[str, Any] = {}
    allowed = ", ".join(sorted(known)) or "none"
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--option")
        if key not in known:
            raise typer.BadParameter(
                f"unknown option {key!r} for layout {layout!r}; known: {allowed}", param_hint="--option"
            )
        options[key] = _option_value(value.strip())
    return options


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    return text
